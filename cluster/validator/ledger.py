"""validator-core's ledger: each job's history and each miner's incidents, written in one place.

History: every status change of a job (organic or streaming) is a ``job_events`` row, whoever
reports it (the validator, the miner, the user); clients read it as the job's history.

Incidents: every attempt or stream lost, and every failed verification, is an ``incidents``
row of one of two kinds. ``miner`` incidents are charged to the miner: an agent that restarted,
a blown deadline, a failed verification, a receipts page that broke the protocol or its budget
(``collection_failed``); they lower its priority for ``incident_penalty_s``, and a failed
verification bans it from new work for ``verification_ban_s``. A failed verification or
collection also voids the miner's streaming work of the scoring cycle: answers that could not
be collected cannot be checked, and are not paid for. A failed collection does not ban: the
page carries no signature of the miner's (a path that rewrites plain HTTP could forge it), and
a proxy that stalls cannot be told from a link that does. ``fabric`` incidents are
not charged: a dead Ray node under a live agent, a ticket nobody fetched, or a miner that went
silent (``miner_unreachable``: a cut link looks the same as a crash, and neither is a signed fact
of cheating) are failures of the shared fabric, not proof of a dishonest miner. Going silent is
free only ``unreachable_free`` times per ``incident_penalty_s``; beyond that it is charged, so
dropping work by cutting one's own link cannot be a habit.

Retiring an attempt gives it up for good: its executor is freed, the incident recorded, and its
job goes back to the queue as attempt n+1 (on another miner), or fails once ``max_attempts``
were lost.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from cluster.protocol.canonical import NS
from cluster.protocol.identity import Clock
from cluster.protocol.jobs import Failure, FailureKind, JobStatus
from cluster.validator import store as db

CHARGED = "miner"  # incidents.kind of an incident charged to the miner
FABRIC = "fabric"  # incidents.kind of a fabric incident, not charged
VERIFICATION_FAILED = "verification_failed"  # incidents.reason of a failed verification
COLLECTION_FAILED = "collection_failed"  # ... of a receipts page that broke the protocol or its budget
UNREACHABLE = "miner_unreachable"  # incidents.reason of work lost because its miner stopped heartbeating
IMPOSTOR = "impostor"  # ... of a Ray node whose resources differ from what its miner was admitted with
ROGUE_WORKLOAD = "rogue_workload"  # ... of a driver, job, actor or task nobody entitled started
BANNING = (VERIFICATION_FAILED, IMPOSTOR, ROGUE_WORKLOAD)  # charged incidents that also ban the miner


def blame(charged: bool) -> str:
    return "charged to the miner" if charged else "fabric incident, not charged"


class Ledger:
    def __init__(self, clock: Clock, *, max_attempts: int) -> None:
        self.clock = clock
        self.max_attempts = max_attempts

    # ------------------------------------------------------------------ history
    def event(self, conn: sa.Connection, job_id: str, attempt: int, status: JobStatus, *,
              reporter: str = "validator", detail: str = "", evidence: str | None = None) -> None:
        """Append one status change to a job's history."""
        conn.execute(db.job_events.insert().values(job_id=job_id, attempt=attempt, status=status.value,
                                                   t_ns=self.clock(), reporter=reporter, detail=detail,
                                                   evidence=evidence))

    # ------------------------------------------------------------------ incidents
    def incident(self, conn: sa.Connection, miner: str, reason: str, *, charged: bool, job_id: str | None,
                 attempt: int | None, evidence: str | None = None) -> None:
        """Record one incident of ``miner`` (``job_id`` None: about the miner, not one job)."""
        conn.execute(db.incidents.insert().values(miner_hotkey=miner, t_ns=self.clock(),
                                                  kind=CHARGED if charged else FABRIC, reason=reason,
                                                  job_id=job_id, attempt=attempt, evidence=evidence))

    def retire(self, conn: sa.Connection, t: sa.Row, *, reason: str, charged: bool,
               evidence: str | None = None) -> None:
        """Give up attempt ``t``: free its executor, record the incident, requeue or fail the job."""
        conn.execute(db.tickets.update().where(db.tickets.c.id == t.id).values(active=False, retired_reason=reason))
        self.incident(conn, t.miner_hotkey, reason, charged=charged, job_id=t.job_id, attempt=t.attempt,
                      evidence=evidence)
        job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == t.job_id)).one()
        if job.current_ticket != t.id or JobStatus(job.status).terminal:
            return
        detail = f"attempt {t.attempt} on miner {t.miner_hotkey} lost: {reason} ({blame(charged)})"
        if t.attempt >= self.max_attempts:
            failure = Failure(kind=FailureKind.horde_failure, reason="executor_disconnected", message=detail,
                              reporter="validator")
            conn.execute(db.jobs.update().where(db.jobs.c.id == job.id).values(
                status=JobStatus.horde_failed.value, current_ticket=None, failure=failure.model_dump(mode="json")))
            self.event(conn, job.id, t.attempt, JobStatus.horde_failed, detail=detail)
        else:
            conn.execute(db.jobs.update().where(db.jobs.c.id == job.id).values(
                status=JobStatus.received.value, current_ticket=None, queued_ns=self.clock()))
            self.event(conn, job.id, t.attempt, JobStatus.received, detail=f"{detail}; re-queued")

    def charged_since(self, conn: sa.Connection, miner: str, since_ns: int) -> int:
        """How many incidents charged to ``miner`` were recorded since ``since_ns``."""
        return conn.execute(sa.select(sa.func.count()).select_from(db.incidents).where(
            db.incidents.c.miner_hotkey == miner, db.incidents.c.kind == CHARGED,
            db.incidents.c.t_ns >= since_ns)).scalar_one()

    def unreachable_charged(self, conn: sa.Connection, miner: str, *, window_s: float, free: int) -> bool:
        """Whether losing work to ``miner`` going silent is charged now: past ``free`` such
        incidents in the last ``window_s``."""
        since = self.clock() - int(window_s * NS)
        seen = conn.execute(sa.select(sa.func.count()).select_from(db.incidents).where(
            db.incidents.c.miner_hotkey == miner, db.incidents.c.reason == UNREACHABLE,
            db.incidents.c.t_ns >= since)).scalar_one()
        return seen >= free

    def banned(self, conn: sa.Connection, *, now_ns: int, ban_s: float) -> set[str]:
        """Miners with a banning incident (a failed verification, an impostor node, a rogue
        workload) in the last ``ban_s``: no new work for them."""
        return set(conn.execute(sa.select(db.incidents.c.miner_hotkey).where(
            db.incidents.c.reason.in_(BANNING),
            db.incidents.c.t_ns >= now_ns - int(ban_s * NS))).scalars())

    def recent(self, conn: sa.Connection, limit: int = 50) -> list[dict[str, Any]]:
        """The last ``limit`` incidents, newest first (without their evidence)."""
        i = db.incidents.c
        return [dict(r._mapping) for r in conn.execute(
            sa.select(i.miner_hotkey, i.kind, i.reason, i.job_id, i.attempt, i.t_ns)
            .order_by(i.id.desc()).limit(limit))]
