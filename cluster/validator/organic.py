"""validator-core's organic jobs: one container run on one miner, for a user with a capability.

    register      the spec checked (image policy, executor class, its time limit) before the
                  capability's budget is spent; the job is ticketed at once if an executor is
                  free and no older job of its class waits, else it queues (``max_wait_s`` 0:
                  rejected instead).
    fetch_ticket  only the miner the ticket names gets it, with the signed spec; the attempt's
                  deadline (stage limits + ``deadline_leeway_s``) starts at the first fetch.
    ticket_current "still current?": an agent asks before uploading, so a superseded attempt
                  uploads nothing.
    report_*      progress and the signed result, accepted only for the job's current attempt.
    cancel        by its user: ends ``cancelled`` now; the agent kills the container at its next
                  heartbeat.
    get / watch   the job as recorded, long-polled (:mod:`.changes`).
    sweep         retire lost attempts (blown deadlines are charged; a ticket nobody fetched and
                  a miner gone silent are not, the latter only up to an allowance, see
                  :mod:`.ledger`), reject jobs that waited too long, serve the queue.

Every write that can free or take an executor holds the allocation lock and is one transaction.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from cluster.errors import InvalidSpec, Refused, TicketRefused
from cluster.protocol.canonical import NS
from cluster.protocol.envelope import SignedEnvelope, seal
from cluster.protocol.identity import Clock, Hotkey
from cluster.protocol.images import ImagePolicy
from cluster.protocol.jobs import (
    Failure, JobResult, JobSpec, JobState, JobStatus, JobView, StatusEvent, Submitted, WATCH_MAX_JOBS,
)
from cluster.protocol.messages import Capability, SpecGrant, StatusReport, TicketFetch
from cluster.settings import ExecutorClass, ValidatorSettings
from cluster.validator import store as db
from cluster.validator.capabilities import CapabilityDesk, sees
from cluster.validator.changes import Changes
from cluster.validator.envelopes import EnvelopeOpener
from cluster.validator.ledger import UNREACHABLE, Ledger
from cluster.validator.placement import Placement, admitted, ticket_ref



class OrganicDesk:
    def __init__(self, settings: ValidatorSettings, *, hotkey: Hotkey, classes: dict[str, ExecutorClass],
                 image_policy: ImagePolicy, engine: sa.Engine, alloc: threading.Lock, opener: EnvelopeOpener,
                 changes: Changes, ledger: Ledger, placement: Placement, capabilities: CapabilityDesk,
                 clock: Clock) -> None:
        self.settings = settings
        self.hotkey = hotkey
        self.classes = classes
        self.image_policy = image_policy
        self.engine = engine
        self.alloc = alloc  # held by every write that can free or take an executor
        self.opener = opener
        self.changes = changes
        self.ledger = ledger
        self.placement = placement
        self.capabilities = capabilities
        self.clock = clock

    # ------------------------------------------------------------------ the user's side
    def register(self, cap: Capability, spec: JobSpec) -> Submitted:
        self.image_policy.check(spec.image)  # before the capability's budget is spent
        cls = self.classes.get(spec.executor_class)
        if cls is None:
            raise InvalidSpec(f"unknown executor class {spec.executor_class!r}; known: {sorted(self.classes)}")
        if spec.execution_timeout_s > cls.max_execution_s:
            raise InvalidSpec(f"execution_timeout_s {spec.execution_timeout_s} exceeds the {spec.executor_class} "
                              f"limit of {cls.max_execution_s} s")
        job_id = uuid.uuid4().hex
        with self.alloc, self.engine.begin() as conn:
            now = self.clock()  # inside the lock: queue order is arrival order
            self.capabilities.spend(conn, self.capabilities.budget(conn, cap))
            conn.execute(db.jobs.insert().values(id=job_id, capability_id=cap.capability_id, user_hotkey=cap.user,
                                                 spec=spec.model_dump(mode="json"), executor_class=spec.executor_class,
                                                 status=JobStatus.received.value, created_ns=now, attempt=0,
                                                 max_wait_s=spec.max_wait_s, queued_ns=now))
            self.ledger.event(conn, job_id, 0, JobStatus.received)
            self.placement.dispatch(conn, only_job=job_id)
            job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == job_id)).one()
            why = ""
            if job.current_ticket is None:
                why = self.placement.queue_reason(conn, job)
                if spec.max_wait_s == 0:
                    self.placement.reject(conn, job, why)
                else:
                    self.ledger.event(conn, job_id, 0, JobStatus.received, detail=f"queued: {why}")
            ticket = self.placement.current_ref(conn, job)
        self.changes.notify()
        if ticket is None and spec.max_wait_s == 0:
            # 409, not 503: validator-core is well; the market has no free executor for this spec now
            raise Refused("no_miner_for_job", f"job {job_id} rejected: {why}; submit it with max_wait_s > 0 to "
                          "let it wait for one, or retry later", status_code=409)
        return Submitted(job_id=job_id, ticket=ticket, queue_reason=why)

    def cancel(self, cap: Capability, job_id: str) -> JobView:
        """Cancel a job of this user: it ends ``cancelled`` now; a running container is killed by
        its agent at the next heartbeat (the answer names the ticket), and its result is refused."""
        with self.alloc, self.engine.begin() as conn:
            job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == job_id, sees(cap))).first()
            if job is None:
                raise Refused("not_found", f"no job {job_id} for user {cap.user}", status_code=404)
            if JobStatus(job.status).terminal:
                raise Refused("already_finished", f"job {job_id} is already {job.status}", status_code=409)
            if job.current_ticket is not None:
                conn.execute(db.tickets.update().where(db.tickets.c.id == job.current_ticket)
                             .values(active=False, retired_reason="cancelled"))
            conn.execute(db.jobs.update().where(db.jobs.c.id == job_id)
                         .values(status=JobStatus.cancelled.value, current_ticket=None))
            self.ledger.event(conn, job_id, job.attempt, JobStatus.cancelled, reporter=cap.user,
                              detail="cancelled by user")
            self.placement.dispatch(conn)
        self.changes.notify()
        return self._get(cap, job_id)

    def get(self, cap: Capability, job_id: str, wait_s: float = 0) -> JobView:
        """The job as recorded; with ``wait_s`` > 0, wait up to that long for a final status."""
        return self.changes.poll(lambda: self._get(cap, job_id), lambda view: view.status.terminal, wait_s)

    async def get_async(self, cap: Capability, job_id: str, wait_s: float = 0) -> JobView:
        """:meth:`get` for the HTTP door: the wait holds no thread."""
        return await self.changes.apoll(lambda: self._get(cap, job_id), lambda view: view.status.terminal, wait_s)

    def watch(self, cap: Capability, known: dict[str, str | None], wait_s: float = 0) -> list[JobState]:
        """States of the jobs in ``known`` (job id -> ticket id the caller last saw), returned as
        soon as one of them is final or has a different ticket, or after ``wait_s``. One request
        lets a driver follow all its jobs (launching a task for every new ticket)."""
        return self.changes.poll(*self._watching(cap, known), wait_s)

    async def watch_async(self, cap: Capability, known: dict[str, str | None], wait_s: float = 0) -> list[JobState]:
        """:meth:`watch` for the HTTP door: the wait holds no thread."""
        return await self.changes.apoll(*self._watching(cap, known), wait_s)

    def _watching(self, cap: Capability, known: dict[str, str | None]
                  ) -> tuple[Callable[[], list[JobState]], Callable[[list[JobState]], bool]]:
        ids = list(known)[:WATCH_MAX_JOBS]

        def read() -> list[JobState]:
            with self.engine.connect() as conn:  # one query for all of them: drivers follow many jobs
                t = db.tickets
                rows = conn.execute(
                    sa.select(db.jobs.c.id, db.jobs.c.status, t.c.id.label("ticket_id"), t.c.attempt,
                              t.c.miner_hotkey, t.c.executor_class)
                    .select_from(db.jobs.outerjoin(t, t.c.id == db.jobs.c.current_ticket))
                    .where(db.jobs.c.id.in_(ids), sees(cap))).all()
            return [JobState(job_id=r.id, status=JobStatus(r.status), ticket=None
                             if JobStatus(r.status).terminal or r.ticket_id is None else
                             ticket_ref(r.ticket_id, r.attempt, r.miner_hotkey, r.executor_class)) for r in rows]

        def changed(states: list[JobState]) -> bool:
            return any(st.status.terminal or (st.ticket.ticket_id if st.ticket else None) != known[st.job_id]
                       for st in states)

        return read, changed

    def list(self, cap: Capability, limit: int = 100) -> list[JobView]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.jobs).where(sees(cap))
                                .order_by(db.jobs.c.created_ns.desc()).limit(limit)).all()
            return [self._view(conn, r, []) for r in rows]

    def _get(self, cap: Capability, job_id: str) -> JobView:
        with self.engine.connect() as conn:
            job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == job_id, sees(cap))).first()
            if job is None:  # another user's job (or one outside a driver's scope) does not exist for you
                raise Refused("not_found", f"no job {job_id} for user {cap.user}", status_code=404)
            events = conn.execute(sa.select(db.job_events).where(db.job_events.c.job_id == job_id)
                                  .order_by(db.job_events.c.id)).all()
            return self._view(conn, job, events)

    def _view(self, conn: sa.Connection, job: sa.Row, events: list[sa.Row]) -> JobView:
        result = None
        if job.result_envelope:
            result = JobResult.model_validate(SignedEnvelope.model_validate_json(job.result_envelope).payload)
        ticket = None if JobStatus(job.status).terminal else self.placement.current_ref(conn, job)
        return JobView(
            job_id=job.id, status=JobStatus(job.status), executor_class=job.executor_class,
            miner_hotkey=job.miner_hotkey, attempt=job.attempt, created_ns=job.created_ns, ticket=ticket,
            failure=Failure.model_validate(job.failure) if job.failure else None, result=result,
            history=[StatusEvent(status=JobStatus(e.status), t_ns=e.t_ns, attempt=e.attempt, reporter=e.reporter,
                                 detail=e.detail) for e in events])

    # ------------------------------------------------------------------ the miner's side
    def fetch_ticket(self, env: SignedEnvelope) -> dict[str, Any]:
        """Hand a ticket and its signed spec to the miner the ticket is addressed to, and nobody else."""
        msg = TicketFetch.model_validate(self.opener.open(env, "ticket_fetch"))
        with self.engine.begin() as conn:
            admitted(conn, env.signer)
            t = conn.execute(sa.select(db.tickets).where(db.tickets.c.id == msg.ticket_id)).first()
            if t is None:
                raise TicketRefused("unknown_ticket", f"no ticket {msg.ticket_id}", status_code=404)
            if t.miner_hotkey != env.signer:
                raise TicketRefused("wrong_miner", f"ticket {msg.ticket_id} is addressed to another miner, not "
                                    f"{env.signer}", status_code=403)
            job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == t.job_id)).one()
            if not t.active or job.current_ticket != t.id:
                raise TicketRefused("ticket_closed", f"ticket {t.id} is no longer current for job {t.job_id}",
                                    status_code=409)
            if t.fetched_ns is None:
                limit_s = JobSpec.model_validate(job.spec).stage_limits_s() + self.settings.deadline_leeway_s
                now = self.clock()
                conn.execute(db.tickets.update().where(db.tickets.c.id == t.id).values(
                    fetched_ns=now, deadline_ns=now + int(limit_s * NS)))
        grant = SpecGrant(ticket_id=t.id, job_id=t.job_id, spec=JobSpec.model_validate(job.spec))
        return {"ticket": SignedEnvelope.model_validate_json(t.envelope).model_dump(mode="json"),
                "spec": seal(self.hotkey, "job_spec", grant, clock=self.clock).model_dump(mode="json")}

    def ticket_current(self, env: SignedEnvelope) -> bool:
        """"Still current?": an agent asks before uploading, so a superseded attempt uploads nothing."""
        msg = TicketFetch.model_validate(self.opener.open(env, "ticket_current"))
        with self.engine.connect() as conn:
            t = conn.execute(sa.select(db.tickets).where(db.tickets.c.id == msg.ticket_id)).first()
            if t is None or t.miner_hotkey != env.signer:
                raise TicketRefused("wrong_miner", f"ticket {msg.ticket_id} is not addressed to {env.signer}",
                                    status_code=403)
            job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == t.job_id)).one()
            return bool(t.active and job.current_ticket == t.id)

    def report_status(self, job_id: str, env: SignedEnvelope) -> None:
        rep = StatusReport.model_validate(self.opener.open(env, "job_status"))
        with self.alloc, self.engine.begin() as conn:
            self._current_ticket(conn, job_id, rep.ticket_id, rep.attempt, env.signer)
            values: dict[str, Any] = {"status": rep.status.value}
            if rep.status.terminal:
                if rep.status == JobStatus.completed or rep.failure is None:
                    raise Refused("malformed", "a terminal status other than a signed result needs a failure",
                                  status_code=400)
                values["failure"] = rep.failure.model_copy(update={"reporter": env.signer}).model_dump(mode="json")
                conn.execute(db.tickets.update().where(db.tickets.c.id == rep.ticket_id).values(active=False))
            conn.execute(db.jobs.update().where(db.jobs.c.id == job_id).values(**values))
            self.ledger.event(conn, job_id, rep.attempt, rep.status, reporter=env.signer, detail=rep.detail,
                              evidence=env.model_dump_json())
            if rep.status.terminal:
                self.placement.dispatch(conn)
        if rep.status.terminal:  # watchers care about final states and new tickets, not progress
            self.changes.notify()

    def report_result(self, job_id: str, env: SignedEnvelope) -> None:
        res = JobResult.model_validate(self.opener.open(env, "job_result"))
        if res.job_id != job_id or res.miner_hotkey != env.signer:
            raise Refused("malformed", "result names another job or miner than its URL and signer", status_code=400)
        status = JobStatus(res.status)
        with self.alloc, self.engine.begin() as conn:
            self._current_ticket(conn, job_id, res.ticket_id, res.attempt, env.signer)
            failure = res.failure.model_copy(update={"reporter": env.signer}) if res.failure else None
            conn.execute(db.jobs.update().where(db.jobs.c.id == job_id).values(
                status=status.value, result_envelope=env.model_dump_json(), current_ticket=None,
                failure=failure.model_dump(mode="json") if failure else None))
            conn.execute(db.tickets.update().where(db.tickets.c.id == res.ticket_id).values(active=False))
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer)
                         .values(jobs_done=db.miners.c.jobs_done + 1))
            detail = failure.reason if failure else ""
            self.ledger.event(conn, job_id, res.attempt, status, reporter=env.signer, detail=detail)
            self.placement.dispatch(conn)
        self.changes.notify()

    @staticmethod
    def _current_ticket(conn: sa.Connection, job_id: str, ticket_id: str, attempt: int, miner: str) -> sa.Row:
        """The job, if ``ticket_id`` is its current attempt and addressed to ``miner``; else a refusal."""
        t = conn.execute(sa.select(db.tickets).where(db.tickets.c.id == ticket_id)).first()
        if t is None or t.job_id != job_id or t.attempt != attempt:
            raise TicketRefused("unknown_ticket", f"no ticket {ticket_id} attempt {attempt} for job {job_id}",
                                status_code=404)
        if t.miner_hotkey != miner:
            raise TicketRefused("wrong_miner", f"ticket {ticket_id} is not addressed to {miner}", status_code=403)
        job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == job_id)).one()
        if job.current_ticket != ticket_id or not t.active:
            raise TicketRefused("ticket_closed", f"attempt {attempt} of job {job_id} is superseded or finished; "
                                "its reports are refused", status_code=409)
        return job

    # ------------------------------------------------------------------ periodic
    def sweep(self) -> None:
        """Retire lost attempts, reject jobs that waited too long, serve the queue."""
        now = self.clock()
        changed = 0
        with self.alloc, self.engine.begin() as conn:
            for t in conn.execute(sa.select(db.tickets).where(db.tickets.c.active.is_(True))).all():
                m = conn.execute(sa.select(db.miners).where(db.miners.c.hotkey == t.miner_hotkey)).first()
                if self.placement.is_lost(m, now):
                    reason, charged = UNREACHABLE, self.ledger.unreachable_charged(
                        conn, t.miner_hotkey, window_s=self.settings.incident_penalty_s,
                        free=self.settings.unreachable_free)
                elif t.fetched_ns is None and now > t.expires_ns:
                    reason, charged = "ticket_not_fetched", False
                elif t.deadline_ns is not None and now > t.deadline_ns:
                    reason, charged = "deadline_passed", True
                else:
                    continue
                self.ledger.retire(conn, t, reason=reason, charged=charged)
                changed += 1
            for job in conn.execute(sa.select(db.jobs).where(db.jobs.c.status == JobStatus.received.value,
                                                             db.jobs.c.current_ticket.is_(None))).all():
                if now - (job.queued_ns or job.created_ns) > job.max_wait_s * NS:
                    self.placement.reject(conn, job, f"waited {job.max_wait_s} s; "
                                          f"{self.placement.queue_reason(conn, job)}")
                    changed += 1
            changed += self.placement.dispatch(conn)
        if changed:
            self.changes.notify()
