"""validator-core's decisions: admission, capabilities, tickets, results. No HTTP here.

Every public method takes already-parsed input, checks the envelope once (the boundary), and
does its writes in one transaction. Executor allocation is serialised by one lock, so two
submissions never take the same free executor.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import sqlalchemy as sa

from cluster._private.chain import ChainBackend
from cluster._private.envelope import SignedEnvelope, open_envelope, seal
from cluster._private.identity import Clock, Hotkey, is_ss58, system_clock
from cluster._private.protocol import (
    Capability, CapabilityRequest, Challenge, ChallengeRequest, Heartbeat, JoinAccepted, JoinRequest,
    NodeStarted, SpecGrant, StatusReport, Submitted, Ticket, TicketFetch, executor_resource, miner_resource,
)
from cluster._private.settings import ValidatorSettings, load_executor_classes
from cluster._private.validator import store as db
from cluster._private.version import local_versions
from cluster.errors import AdmissionRefused, CapabilityRefused, InvalidSpec, Refused, SignatureRejected, TicketRefused
from jobs._private.models import Failure, FailureKind, JobResult, JobSpec, JobStatus, JobView, StatusEvent

NS = 1_000_000_000


class ValidatorCore:
    def __init__(self, settings: ValidatorSettings, *, hotkey: Hotkey, chain: ChainBackend, ray_token: str,
                 clock: Clock = system_clock) -> None:
        self.settings = settings
        self.hotkey = hotkey
        self.chain = chain
        self.ray_token = ray_token
        self.clock = clock
        self.classes = load_executor_classes(settings.executor_classes_path)
        self.engine = db.open_engine(settings.resolved_db_url())
        # a nonce older than the skew window is refused as stale anyway; keep a margin
        self.guard = db.DbNonceGuard(self.engine, keep_s=4 * settings.max_clock_skew_s + 60)
        self._alloc = threading.Lock()
        self._changed = threading.Condition()  # wakes long-polling readers when a job ends

    # ------------------------------------------------------------------ helpers
    def _open(self, env: SignedEnvelope, kind: str, signers: list[str] | None = None) -> dict[str, Any]:
        return open_envelope(env, kind=kind, max_skew_s=self.settings.max_clock_skew_s, signers=signers,
                             guard=self.guard, clock=self.clock)

    def _admitted(self, conn: sa.Connection, hotkey: str) -> sa.Row:
        row = conn.execute(sa.select(db.miners).where(db.miners.c.hotkey == hotkey)).first()
        if row is None:
            raise AdmissionRefused("not_admitted", f"miner {hotkey} has not joined this validator; run admission first",
                                   status_code=403)
        return row

    def _event(self, conn: sa.Connection, job_id: str, attempt: int, status: JobStatus, *, reporter: str = "validator",
               detail: str = "", evidence: str | None = None) -> None:
        conn.execute(db.job_events.insert().values(job_id=job_id, attempt=attempt, status=status.value,
                                                   t_ns=self.clock(), reporter=reporter, detail=detail,
                                                   evidence=evidence))

    # ------------------------------------------------------------------ admission
    def challenge(self, req: ChallengeRequest) -> Challenge:
        if not is_ss58(req.miner_hotkey):
            raise AdmissionRefused("malformed", f"{req.miner_hotkey!r} is not an SS58 address", status_code=400)
        ch = Challenge(nonce=uuid.uuid4().hex, validator_hotkey=self.hotkey.ss58,
                       expires_ns=self.clock() + int(self.settings.challenge_ttl_s * NS))
        with self.engine.begin() as conn:
            conn.execute(db.challenges.insert().values(nonce=ch.nonce, miner_hotkey=req.miner_hotkey,
                                                       expires_ns=ch.expires_ns, used=False))
        return ch

    def join(self, env: SignedEnvelope) -> JoinAccepted:
        req = JoinRequest.model_validate(self._open(env, "admission_join"))
        miner = env.signer
        if req.validator != self.hotkey.ss58:
            raise AdmissionRefused("wrong_validator", f"join is addressed to {req.validator}, this validator is "
                                   f"{self.hotkey.ss58}", status_code=403)
        now = self.clock()
        with self.engine.begin() as conn:
            ch = conn.execute(sa.select(db.challenges).where(db.challenges.c.nonce == req.challenge)).first()
            if ch is None or ch.miner_hotkey != miner:
                raise AdmissionRefused("bad_challenge", "unknown challenge for this hotkey; ask for a new one",
                                       status_code=403)
            if ch.used:
                raise AdmissionRefused("bad_challenge", "challenge already used; ask for a new one", status_code=403)
            if now > ch.expires_ns:
                raise AdmissionRefused("bad_challenge", f"challenge expired {(now - ch.expires_ns) / NS:.1f} s ago; "
                                       "ask for a new one", status_code=403)
            conn.execute(db.challenges.update().where(db.challenges.c.nonce == req.challenge).values(used=True))
        self._check_eligible(miner)
        ours = local_versions()
        for name in ("rayhorde", "ray", "python"):
            theirs = req.versions.get(name)
            if theirs != ours[name]:
                raise AdmissionRefused("version_mismatch", f"miner runs {name} {theirs}; this validator requires "
                                       f"{name} {ours[name]}: install the matching version and join again",
                                       status_code=403)
        unknown = sorted(set(req.executor_classes) - set(self.classes))
        if unknown or not req.executor_classes:
            raise AdmissionRefused("unknown_executor_class", f"unknown executor classes {unknown}; known: "
                                   f"{sorted(self.classes)}", status_code=403)
        if any(not 1 <= n <= 64 for n in req.executor_classes.values()):
            raise AdmissionRefused("malformed", "executor counts must be between 1 and 64", status_code=400)
        with self.engine.begin() as conn:
            conn.execute(db.miners.delete().where(db.miners.c.hotkey == miner))
            conn.execute(db.miners.insert().values(hotkey=miner, admitted_ns=now, executor_classes=req.executor_classes,
                                                   proxy_url=req.proxy_url, versions=req.versions, node_id=None,
                                                   last_heartbeat_ns=now, jobs_done=0))
        resources = {miner_resource(miner): 1.0}
        resources.update({executor_resource(c): float(n) for c, n in req.executor_classes.items()})
        return JoinAccepted(gcs_address=self.settings.gcs_address(), ray_token=self.ray_token, resources=resources,
                            heartbeat_interval_s=self.settings.heartbeat_interval_s,
                            validator_hotkey=self.hotkey.ss58)

    def _check_eligible(self, miner: str) -> None:
        mg = self.chain.metagraph(self.settings.netuid)
        if mg.neuron(miner) is None:
            raise AdmissionRefused("not_registered", f"hotkey {miner} is not registered on subnet {mg.netuid} "
                                   f"(metagraph at block {mg.block}); register it, then join again", status_code=403)
        if miner in self.settings.banned_hotkeys:
            raise AdmissionRefused("banned", f"hotkey {miner} is banned by this validator", status_code=403)

    def node_started(self, env: SignedEnvelope) -> None:
        msg = NodeStarted.model_validate(self._open(env, "node_started"))
        with self.engine.begin() as conn:
            self._admitted(conn, env.signer)
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer)
                         .values(node_id=msg.node_id, last_heartbeat_ns=self.clock()))

    def heartbeat(self, env: SignedEnvelope) -> None:
        Heartbeat.model_validate(self._open(env, "heartbeat"))
        with self.engine.begin() as conn:
            self._admitted(conn, env.signer)
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer)
                         .values(last_heartbeat_ns=self.clock()))

    # ------------------------------------------------------------------ capabilities
    def issue_capability(self, env: SignedEnvelope) -> str:
        req = CapabilityRequest.model_validate(self._open(env, "capability_request"))
        if req.validator != self.hotkey.ss58:
            raise CapabilityRefused("wrong_validator", f"request is addressed to {req.validator}, this validator is "
                                    f"{self.hotkey.ss58}", status_code=403)
        if env.signer not in self.settings.users:
            raise CapabilityRefused("not_whitelisted", f"user {env.signer} is not on this validator's user whitelist; "
                                    "ask its operator to add the hotkey to `users`", status_code=403)
        if req.ttl_s > self.settings.capability_max_ttl_s:
            raise CapabilityRefused("ttl_too_long", f"ttl_s {req.ttl_s} exceeds this validator's maximum "
                                    f"{self.settings.capability_max_ttl_s:g} s", status_code=400)
        cap = Capability(capability_id=uuid.uuid4().hex, user=env.signer, max_jobs=req.max_jobs,
                         expires_ns=self.clock() + req.ttl_s * NS)
        with self.engine.begin() as conn:
            conn.execute(db.capabilities.insert().values(id=cap.capability_id, user_hotkey=cap.user,
                                                         max_jobs=cap.max_jobs, expires_ns=cap.expires_ns,
                                                         jobs_used=0))
        return seal(self.hotkey, "capability", cap, clock=self.clock).to_token()

    def check_capability(self, token: str | None) -> Capability:
        if not token:
            raise CapabilityRefused("no_capability", "send a capability as `Authorization: Bearer <capability>`; "
                                    "get one with `rayhorde capability`", status_code=401)
        try:
            env = SignedEnvelope.from_token(token)
            cap = Capability.model_validate(open_envelope(env, kind="capability", max_skew_s=0,
                                                          signers=[self.hotkey.ss58], check_time=False))
        except SignatureRejected as exc:
            raise CapabilityRefused("invalid_capability", f"capability refused: {exc.message}", status_code=401) from exc
        now = self.clock()
        if now > cap.expires_ns:
            raise CapabilityRefused("capability_expired", f"capability expired {(now - cap.expires_ns) / NS:.0f} s ago; "
                                    "request a new one", status_code=401)
        return cap

    # ------------------------------------------------------------------ jobs
    def register_job(self, cap: Capability, spec: JobSpec) -> Submitted:
        cls = self.classes.get(spec.executor_class)
        if cls is None:
            raise InvalidSpec(f"unknown executor class {spec.executor_class!r}; known: {sorted(self.classes)}")
        if spec.execution_timeout_s > cls.max_execution_s:
            raise InvalidSpec(f"execution_timeout_s {spec.execution_timeout_s} exceeds the {spec.executor_class} "
                              f"limit of {cls.max_execution_s} s")
        job_id = uuid.uuid4().hex
        now = self.clock()
        with self._alloc, self.engine.begin() as conn:
            row = conn.execute(sa.select(db.capabilities).where(db.capabilities.c.id == cap.capability_id)).first()
            if row is None:
                raise CapabilityRefused("invalid_capability", "capability unknown to this validator", status_code=401)
            if row.jobs_used >= row.max_jobs:
                raise CapabilityRefused("over_budget", f"capability allows {row.max_jobs} jobs and all are used; "
                                        "request a new capability", status_code=403)
            conn.execute(db.capabilities.update().where(db.capabilities.c.id == row.id)
                         .values(jobs_used=row.jobs_used + 1))
            conn.execute(db.jobs.insert().values(id=job_id, capability_id=cap.capability_id, user_hotkey=cap.user,
                                                 spec=spec.model_dump(mode="json"), executor_class=spec.executor_class,
                                                 status=JobStatus.received.value, created_ns=now, attempt=0))
            self._event(conn, job_id, 0, JobStatus.received)
            miner, why = self._pick_miner(conn, spec.executor_class)
            if miner is None:
                failure = Failure(kind=FailureKind.rejection, reason="no_miner_for_job", message=why)
                conn.execute(db.jobs.update().where(db.jobs.c.id == job_id)
                             .values(status=JobStatus.rejected.value, failure=failure.model_dump(mode="json")))
                self._event(conn, job_id, 0, JobStatus.rejected, detail=f"no_miner_for_job: {why}")
            else:
                ticket = self._issue_ticket(conn, job_id, 1, miner, spec.executor_class)
        if miner is None:
            raise Refused("no_miner_for_job", f"job {job_id} rejected: {why}", status_code=503)
        return Submitted(job_id=job_id, ticket_id=ticket.ticket_id, attempt=1, miner_hotkey=miner,
                         executor_class=spec.executor_class,
                         resources={miner_resource(miner): 0.001, executor_resource(spec.executor_class): 1.0})

    def _pick_miner(self, conn: sa.Connection, executor_class: str) -> tuple[str | None, str]:
        live_after = self.clock() - int(self.settings.heartbeat_timeout_s * NS)
        offered = total_free = 0
        candidates: list[tuple[int, int, str]] = []
        for m in conn.execute(sa.select(db.miners).where(db.miners.c.node_id.is_not(None))):
            n = int(m.executor_classes.get(executor_class, 0))
            if n == 0 or (m.last_heartbeat_ns or 0) < live_after:
                continue
            busy = conn.execute(sa.select(sa.func.count()).select_from(db.tickets).where(
                db.tickets.c.miner_hotkey == m.hotkey, db.tickets.c.executor_class == executor_class,
                db.tickets.c.active.is_(True))).scalar_one()
            offered += n
            if n - busy > 0:
                total_free += n - busy
                issued = conn.execute(sa.select(sa.func.count()).select_from(db.tickets)
                                      .where(db.tickets.c.miner_hotkey == m.hotkey)).scalar_one()
                candidates.append((-(n - busy), issued, m.hotkey))  # most free, then least used
        if not candidates:
            return None, f"0 of {offered} {executor_class} executors free on live admitted miners"
        return min(candidates)[2], ""

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

    def fetch_ticket(self, env: SignedEnvelope) -> dict[str, Any]:
        """Hand a ticket and its signed spec to the miner the ticket is addressed to, and nobody else."""
        msg = TicketFetch.model_validate(self._open(env, "ticket_fetch"))
        with self.engine.begin() as conn:
            self._admitted(conn, env.signer)
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
        grant = SpecGrant(ticket_id=t.id, job_id=t.job_id, spec=JobSpec.model_validate(job.spec))
        return {"ticket": SignedEnvelope.model_validate_json(t.envelope).model_dump(mode="json"),
                "spec": seal(self.hotkey, "job_spec", grant, clock=self.clock).model_dump(mode="json")}

    def _current_ticket(self, conn: sa.Connection, job_id: str, ticket_id: str, attempt: int, miner: str) -> sa.Row:
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

    def report_status(self, job_id: str, env: SignedEnvelope) -> None:
        rep = StatusReport.model_validate(self._open(env, "job_status"))
        with self.engine.begin() as conn:
            self._current_ticket(conn, job_id, rep.ticket_id, rep.attempt, env.signer)
            values: dict[str, Any] = {"status": rep.status.value}
            if rep.status.terminal:
                if rep.status == JobStatus.completed or rep.failure is None:
                    raise Refused("malformed", "a terminal status other than a signed result needs a failure",
                                  status_code=400)
                values["failure"] = rep.failure.model_copy(update={"reporter": env.signer}).model_dump(mode="json")
                conn.execute(db.tickets.update().where(db.tickets.c.id == rep.ticket_id).values(active=False))
            conn.execute(db.jobs.update().where(db.jobs.c.id == job_id).values(**values))
            self._event(conn, job_id, rep.attempt, rep.status, reporter=env.signer, detail=rep.detail,
                        evidence=env.model_dump_json())
        if rep.status.terminal:
            self._notify()

    def report_result(self, job_id: str, env: SignedEnvelope) -> None:
        res = JobResult.model_validate(self._open(env, "job_result"))
        if res.job_id != job_id or res.miner_hotkey != env.signer:
            raise Refused("malformed", "result names another job or miner than its URL and signer", status_code=400)
        status = JobStatus(res.status)
        with self.engine.begin() as conn:
            self._current_ticket(conn, job_id, res.ticket_id, res.attempt, env.signer)
            failure = res.failure.model_copy(update={"reporter": env.signer}) if res.failure else None
            conn.execute(db.jobs.update().where(db.jobs.c.id == job_id).values(
                status=status.value, result_envelope=env.model_dump_json(),
                failure=failure.model_dump(mode="json") if failure else None))
            conn.execute(db.tickets.update().where(db.tickets.c.id == res.ticket_id).values(active=False))
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer)
                         .values(jobs_done=db.miners.c.jobs_done + 1))
            detail = failure.reason if failure else ""
            self._event(conn, job_id, res.attempt, status, reporter=env.signer, detail=detail)
        self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def get_job(self, cap: Capability, job_id: str, wait_s: float = 0) -> JobView:
        """The job as recorded; with ``wait_s`` > 0, wait up to that long for a final status."""
        deadline = time.monotonic() + min(wait_s, 30)
        while True:
            view = self._get_job(cap, job_id)
            remaining = deadline - time.monotonic()
            if view.status.terminal or remaining <= 0:
                return view
            with self._changed:
                self._changed.wait(min(remaining, 1.0))  # the 1 s cap also covers a missed notify

    def _get_job(self, cap: Capability, job_id: str) -> JobView:
        with self.engine.connect() as conn:
            job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == job_id)).first()
            if job is None or job.user_hotkey != cap.user:  # another user's job does not exist for you
                raise Refused("not_found", f"no job {job_id} for user {cap.user}", status_code=404)
            events = conn.execute(sa.select(db.job_events).where(db.job_events.c.job_id == job_id)
                                  .order_by(db.job_events.c.id)).all()
        return self._view(job, events)

    def list_jobs(self, cap: Capability, limit: int = 100) -> list[JobView]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.jobs).where(db.jobs.c.user_hotkey == cap.user)
                                .order_by(db.jobs.c.created_ns.desc()).limit(limit)).all()
        return [self._view(r, []) for r in rows]

    def _view(self, job: sa.Row, events: list[sa.Row]) -> JobView:
        result = None
        if job.result_envelope:
            result = JobResult.model_validate(SignedEnvelope.model_validate_json(job.result_envelope).payload)
        return JobView(
            job_id=job.id, status=JobStatus(job.status), executor_class=job.executor_class,
            miner_hotkey=job.miner_hotkey, attempt=job.attempt, created_ns=job.created_ns,
            failure=Failure.model_validate(job.failure) if job.failure else None, result=result,
            history=[StatusEvent(status=JobStatus(e.status), t_ns=e.t_ns, attempt=e.attempt, reporter=e.reporter,
                                 detail=e.detail) for e in events])

    def cluster_status(self) -> dict[str, Any]:
        now = self.clock()
        with self.engine.connect() as conn:
            out = []
            for m in conn.execute(sa.select(db.miners)):
                busy = conn.execute(sa.select(sa.func.count()).select_from(db.tickets).where(
                    db.tickets.c.miner_hotkey == m.hotkey, db.tickets.c.active.is_(True))).scalar_one()
                out.append({"hotkey": m.hotkey, "node_id": m.node_id, "executor_classes": m.executor_classes,
                            "busy_executors": busy, "jobs_done": m.jobs_done,
                            "heartbeat_age_s": round((now - (m.last_heartbeat_ns or 0)) / NS, 1)})
            counts = dict(conn.execute(sa.select(db.jobs.c.status, sa.func.count()).group_by(db.jobs.c.status)).all())
        return {"validator": self.hotkey.ss58, "gcs_address": self.settings.gcs_address(), "miners": out,
                "jobs": counts}
