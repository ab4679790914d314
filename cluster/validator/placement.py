"""validator-core's placement: which miner gets work, and the queue of organic jobs waiting for one.

Liveness: an admitted miner is live while its last heartbeat is within ``heartbeat_timeout_s``
(:meth:`Placement.is_live`: who may get new work). It is lost, and its attempts are retired and
its streams ended, once it has been silent that long while validator-core was serving all the
time (:meth:`Placement.is_lost`): a restart or a stall of validator-core charges no miner.

Picking a miner for an executor class: among live admitted miners with a Ray node, not banned
for a failed verification, and with a free executor of that class (organic attempts and streams
each hold one), the one with the fewest charged incidents in the last ``incident_penalty_s``,
then the most free executors, then the fewest tickets issued. Fabric incidents do not count
against a miner.

The queue: a job with no free executor waits (status ``received``, the reason in its history) up
to its ``max_wait_s``; whenever an executor frees, :meth:`Placement.dispatch` tickets the oldest
waiting jobs first. Every caller of :meth:`~Placement.dispatch` holds the allocation lock, so two
writers never take the same free executor and the queue is served in order.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from cluster.errors import AdmissionRefused
from cluster.protocol.canonical import NS
from cluster.protocol.envelope import seal
from cluster.protocol.identity import Clock, Hotkey
from cluster.protocol.jobs import Failure, FailureKind, JobStatus, TicketRef
from cluster.protocol.messages import Ticket, executor_resource, miner_resource
from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.ledger import Ledger
from cluster.validator.limits import Uptime

ACTIVE_STREAM = (JobStatus.accepted.value, JobStatus.streaming_ready.value)  # a stream in these holds an executor


def admitted(conn: sa.Connection, hotkey: str) -> sa.Row:
    """The miner's row, or a refusal if it has not joined this validator."""
    row = conn.execute(sa.select(db.miners).where(db.miners.c.hotkey == hotkey)).first()
    if row is None:
        raise AdmissionRefused("not_admitted", f"miner {hotkey} has not joined this validator; run admission first",
                               status_code=403)
    return row


def ticket_ref(ticket_id: str, attempt: int, miner: str, executor_class: str) -> TicketRef:
    """What a driver needs to run an attempt: the ticket and the Ray resources that pin it to its miner."""
    return TicketRef(ticket_id=ticket_id, attempt=attempt, miner_hotkey=miner, executor_class=executor_class,
                     resources={miner_resource(miner): 0.001, executor_resource(executor_class): 1.0})


class Placement:
    def __init__(self, settings: ValidatorSettings, *, hotkey: Hotkey, ledger: Ledger, clock: Clock,
                 uptime: Uptime | None = None) -> None:
        self.settings = settings
        self.uptime = uptime or Uptime(clock)
        self.hotkey = hotkey
        self.ledger = ledger
        self.clock = clock

    def is_live(self, miner: sa.Row | None, now_ns: int) -> bool:
        """The liveness rule for new work: admitted, and its last heartbeat within ``heartbeat_timeout_s``."""
        live_after = now_ns - int(self.settings.heartbeat_timeout_s * NS)
        return miner is not None and (miner.last_heartbeat_ns or 0) >= live_after

    def is_lost(self, miner: sa.Row | None, now_ns: int) -> bool:
        """The rule for taking work away: not admitted, or silent for ``heartbeat_timeout_s`` while
        validator-core was serving all that time. Heartbeats it could not hear (it was restarting
        or stalled: :class:`~cluster.validator.limits.Uptime`) are no evidence against a miner."""
        if miner is None:
            return True
        heard_after = now_ns - int(self.settings.heartbeat_timeout_s * NS)
        return max(miner.last_heartbeat_ns or 0, self.uptime.since_ns) < heard_after

    def pick_miner(self, conn: sa.Connection, executor_class: str, *, exclude: set[str]) -> tuple[str | None, str]:
        """The miner to take one executor of ``executor_class`` now, or (None, why none can)."""
        now = self.clock()
        penalty_after = now - int(self.settings.incident_penalty_s * NS)
        offered = total_free = 0
        candidates: list[tuple[int, int, int, str]] = []
        banned = self.ledger.banned(conn, now_ns=now, ban_s=self.settings.verification_ban_s)
        for m in conn.execute(sa.select(db.miners).where(db.miners.c.node_id.is_not(None))):
            n = int(m.executor_classes.get(executor_class, 0))
            if n == 0 or not self.is_live(m, now) or m.hotkey in banned:
                continue  # a miner that failed a verification gets no new work for a while
            busy = conn.execute(sa.select(sa.func.count()).select_from(db.tickets).where(
                db.tickets.c.miner_hotkey == m.hotkey, db.tickets.c.executor_class == executor_class,
                db.tickets.c.active.is_(True))).scalar_one()
            busy += conn.execute(sa.select(sa.func.count()).select_from(db.streams).where(
                db.streams.c.miner_hotkey == m.hotkey, db.streams.c.executor_class == executor_class,
                db.streams.c.status.in_(ACTIVE_STREAM))).scalar_one()
            offered += n
            if n - busy > 0 and m.hotkey not in exclude:
                total_free += n - busy
                issued = conn.execute(sa.select(sa.func.count()).select_from(db.tickets)
                                      .where(db.tickets.c.miner_hotkey == m.hotkey)).scalar_one()
                charged = self.ledger.charged_since(conn, m.hotkey, penalty_after)
                candidates.append((charged, -(n - busy), issued, m.hotkey))  # reliable, most free, least used
        if not candidates:
            return None, f"{total_free} of {offered} {executor_class} executors free on live admitted miners"
        return min(candidates)[3], ""

    # ------------------------------------------------------------------ the queue
    def dispatch(self, conn: sa.Connection, only_job: str | None = None) -> int:
        """Ticket waiting jobs, oldest first, while executors of their class are free; return how
        many got a ticket. Caller holds the allocation lock."""
        q = sa.select(db.jobs).where(db.jobs.c.status == JobStatus.received.value, db.jobs.c.current_ticket.is_(None))
        if only_job is not None:
            q = q.where(db.jobs.c.id == only_job)
        full: set[str] = set()
        issued = 0
        for job in conn.execute(q.order_by(db.jobs.c.created_ns)).all():
            if job.executor_class in full:
                continue
            if only_job is not None and self._waiting_ahead(conn, job):
                return issued  # a newcomer queues behind older waiting jobs of its class
            miner, _ = self.pick_miner(conn, job.executor_class, exclude=self._failed_miners(conn, job.id))
            if miner is None:
                full.add(job.executor_class)
                continue
            ticket = self._issue_ticket(conn, job.id, job.attempt + 1, miner, job.executor_class)
            self.ledger.event(conn, job.id, ticket.attempt, JobStatus.received,
                              detail=f"ticket for miner {miner} (attempt {ticket.attempt})")
            issued += 1
        return issued

    def queue_reason(self, conn: sa.Connection, job: sa.Row) -> str:
        """Why ``job`` waits: what executors are free, and how many jobs are ahead of it."""
        _, why = self.pick_miner(conn, job.executor_class, exclude=set())
        return f"{why or 'no executor free for this job'}; {self._waiting_ahead(conn, job)} jobs ahead"

    def reject(self, conn: sa.Connection, job: sa.Row, why: str) -> None:
        """End a waiting job ``rejected``: no miner could take it in time."""
        failure = Failure(kind=FailureKind.rejection, reason="no_miner_for_job", message=why)
        conn.execute(db.jobs.update().where(db.jobs.c.id == job.id)
                     .values(status=JobStatus.rejected.value, failure=failure.model_dump(mode="json")))
        self.ledger.event(conn, job.id, job.attempt, JobStatus.rejected, detail=f"no_miner_for_job: {why}")

    @staticmethod
    def current_ref(conn: sa.Connection, job: sa.Row) -> TicketRef | None:
        """The job's current ticket, as its driver sees it (None: it has none)."""
        if job.current_ticket is None:
            return None
        t = conn.execute(sa.select(db.tickets).where(db.tickets.c.id == job.current_ticket)).one()
        return ticket_ref(t.id, t.attempt, t.miner_hotkey, t.executor_class)

    def _issue_ticket(self, conn: sa.Connection, job_id: str, attempt: int, miner: str, executor_class: str) -> Ticket:
        now = self.clock()
        ticket = Ticket(ticket_id=uuid.uuid4().hex, job_id=job_id, attempt=attempt, miner=miner,
                        executor_class=executor_class, expires_ns=now + int(self.settings.ticket_ttl_s * NS))
        env = seal(self.hotkey, "ticket", ticket, clock=self.clock)
        conn.execute(db.tickets.insert().values(id=ticket.ticket_id, job_id=job_id, attempt=attempt, miner_hotkey=miner,
                                                executor_class=executor_class, issued_ns=now,
                                                expires_ns=ticket.expires_ns, active=True,
                                                envelope=env.model_dump_json()))
        conn.execute(db.jobs.update().where(db.jobs.c.id == job_id)
                     .values(miner_hotkey=miner, attempt=attempt, current_ticket=ticket.ticket_id))
        return ticket

    @staticmethod
    def _waiting_ahead(conn: sa.Connection, job: sa.Row) -> int:
        return conn.execute(sa.select(sa.func.count()).select_from(db.jobs).where(
            db.jobs.c.status == JobStatus.received.value, db.jobs.c.current_ticket.is_(None),
            db.jobs.c.executor_class == job.executor_class, db.jobs.c.created_ns < job.created_ns,
            db.jobs.c.id != job.id)).scalar_one()

    @staticmethod
    def _failed_miners(conn: sa.Connection, job_id: str) -> set[str]:
        """Miners that already lost an attempt of this job: the next attempt goes elsewhere."""
        return set(conn.execute(sa.select(db.tickets.c.miner_hotkey).where(
            db.tickets.c.job_id == job_id, db.tickets.c.retired_reason.is_not(None))).scalars())
