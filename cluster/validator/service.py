"""validator-core's decisions: admission, capabilities, tickets, results. No HTTP here.

Every public method takes already-parsed input, checks the envelope once (the boundary), and
does its writes in one transaction. Every write that can free or take an executor holds one
lock (``_alloc``), so two submissions never take the same free executor and the queue is served
in order.

Queue and attempts: a job with no free executor waits (status ``received``, the reason in its
history) up to its ``max_wait_s``; whenever an executor frees, :meth:`_dispatch` tickets the
oldest waiting jobs. An attempt that is lost (its miner's Ray node died, its agent stopped
heartbeating or restarted, its deadline passed) is retired with an incident and the job goes
back to the queue as attempt n+1 on another miner, up to ``max_attempts`` (DESIGN §1 point 8:
a dead Ray node under a live agent is a fabric incident, not charged to the miner).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import sqlalchemy as sa

from cluster.protocol.canonical import NS
from cluster.chain import ChainBackend
from cluster.protocol.envelope import SignedEnvelope, open_envelope, seal
from cluster.protocol.identity import Clock, Hotkey, is_ss58, system_clock
from cluster.protocol.messages import (
    Capability, CapabilityRequest, Challenge, ChallengeRequest, Heartbeat, JoinAccepted, JoinRequest,
    NodeLost, NodeStarted, SpecGrant, StatusReport, Submitted, Ticket, TicketFetch, TicketRef, executor_resource,
    miner_resource,
)
from cluster.settings import ValidatorSettings, load_executor_classes
from cluster.validator import store as db
from cluster.validator.probes import ProbeDesk
from cluster.validator.scoring import ScoringDesk
from cluster.validator.serve_rest import ServeRest
from cluster.validator.streams import StreamDesk
from cluster.validator.verification import VerificationDesk, banned_miners, cluster_runner
from cluster.protocol.version import local_versions
from cluster.protocol.images import ImagePolicy
from cluster.errors import (
    AdmissionRefused, CapabilityRefused, ConfigError, InvalidSpec, Refused, SignatureRejected, TicketRefused,
)
from cluster.protocol.jobs import Failure, FailureKind, JobResult, JobSpec, JobState, JobStatus, JobView, StatusEvent



class ValidatorCore:
    def __init__(self, settings: ValidatorSettings, *, hotkey: Hotkey, chain: ChainBackend, ray_token: str,
                 clock: Clock = system_clock) -> None:
        self.settings = settings
        self.hotkey = hotkey
        self.chain = chain
        self.ray_token = ray_token
        self.clock = clock
        self.classes = load_executor_classes(settings.executor_classes_path)
        try:
            self.image_policy = ImagePolicy(settings.image_allow, settings.image_deny)
        except ValueError as exc:
            raise ConfigError(f"image_allow / image_deny: {exc}") from exc
        self.engine = db.open_engine(settings.resolved_db_url())
        # a nonce older than the skew window is refused as stale anyway; keep a margin
        self.guard = db.DbNonceGuard(self.engine, keep_s=4 * settings.max_clock_skew_s + 60)
        self._alloc = threading.Lock()
        self._changed = threading.Condition()  # wakes long-polling readers when a job changes
        self._stop = threading.Event()
        serve = None
        if settings.deploy_streams:
            serve = ServeRest(settings.dashboard_url(), ray_token, http_port=settings.resolved_serve_http_port(),
                              request_timeout_s=settings.serve_request_timeout_s)
        self.probes = ProbeDesk(self)  # before the streams: their client keys include its probe keys
        self.streams = StreamDesk(self, serve)
        runner = None
        if settings.verification_address:
            if settings.verification_token_path is None:
                raise ConfigError("verification_address needs verification_token_path (that cluster's Ray token)")
            runner = cluster_runner(settings.verification_address, settings.verification_token_path.read_text().strip(),
                                    str(settings.home / "verification-driver"), settings.verifier_factory,
                                    keep_warm_s=settings.verify_keep_warm_s)
        self.verification = VerificationDesk(self, runner)
        self.scoring = ScoringDesk(self)

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
            taken = conn.execute(db.challenges.update().where(db.challenges.c.nonce == req.challenge,
                                                              db.challenges.c.used.is_(False)).values(used=True))
            if taken.rowcount != 1:  # a concurrent join won the race for this challenge
                raise AdmissionRefused("bad_challenge", "challenge already used; ask for a new one", status_code=403)
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
        with self._alloc, self.engine.begin() as conn:
            for t in self._active_tickets(conn, miner):  # a restarted agent lost whatever it ran
                self._retire(conn, t, reason="agent_restarted", charged=True)
            ended = self.streams.miner_lost(conn, miner, reason="agent_restarted", charged=True)
            conn.execute(db.miners.delete().where(db.miners.c.hotkey == miner))
            conn.execute(db.miners.insert().values(hotkey=miner, admitted_ns=now, executor_classes=req.executor_classes,
                                                   proxy_url=req.proxy_url, versions=req.versions, node_id=None,
                                                   last_heartbeat_ns=now, jobs_done=0))
        if ended:
            self.streams.reconcile()
            self._notify()
        resources = {miner_resource(miner): 1.0}
        resources.update({executor_resource(c): float(n) for c, n in req.executor_classes.items()})
        return JoinAccepted(gcs_address=self.settings.gcs_address(), ray_token=self.ray_token, resources=resources,
                            heartbeat_interval_s=self.settings.heartbeat_interval_s,
                            validator_hotkey=self.hotkey.ss58,
                            serve_http_port=self.settings.resolved_serve_http_port())

    def _check_eligible(self, miner: str) -> None:
        mg = self.chain.metagraph(self.settings.netuid)
        if mg.neuron(miner) is None:
            raise AdmissionRefused("not_registered", f"hotkey {miner} is not registered on subnet {mg.netuid} "
                                   f"(metagraph at block {mg.block}); register it, then join again", status_code=403)
        if miner in self.settings.banned_hotkeys:
            raise AdmissionRefused("banned", f"hotkey {miner} is banned by this validator", status_code=403)

    def node_started(self, env: SignedEnvelope) -> None:
        msg = NodeStarted.model_validate(self._open(env, "node_started"))
        with self._alloc, self.engine.begin() as conn:
            self._admitted(conn, env.signer)
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer)
                         .values(node_id=msg.node_id, last_heartbeat_ns=self.clock()))
            issued = self._dispatch(conn)  # new capacity
        if issued:
            self._notify()

    def node_lost(self, env: SignedEnvelope) -> None:
        """The agent saw its Ray node die: a fabric incident (DESIGN §1 point 8), not charged."""
        msg = NodeLost.model_validate(self._open(env, "node_lost"))
        with self._alloc, self.engine.begin() as conn:
            miner = self._admitted(conn, env.signer)
            if miner.node_id is not None and miner.node_id != msg.node_id:
                return  # a late report about a node already replaced: the current one's attempts stand
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer).values(node_id=None))
            for t in self._active_tickets(conn, env.signer):
                self._retire(conn, t, reason="ray_node_lost", charged=False, evidence=env.model_dump_json())
            self.streams.miner_lost(conn, env.signer, reason="ray_node_lost", charged=False,
                                    evidence=env.model_dump_json())
            self._dispatch(conn)
        self.streams.reconcile()  # the dead node's apps leave Serve's config
        self._notify()

    def heartbeat(self, env: SignedEnvelope) -> list[str]:
        """Record liveness; answer with the tickets the miner still runs that are no longer
        current (cancelled by their user, or retired and given to another miner): kill those."""
        beat = Heartbeat.model_validate(self._open(env, "heartbeat"))
        with self.engine.begin() as conn:
            self._admitted(conn, env.signer)
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer)
                         .values(last_heartbeat_ns=self.clock()))
            if not beat.running_tickets:
                return []
            return list(conn.execute(sa.select(db.tickets.c.id).where(
                db.tickets.c.id.in_(beat.running_tickets[:1000]), db.tickets.c.miner_hotkey == env.signer,
                db.tickets.c.active.is_(False))).scalars())

    def cancel_job(self, cap: Capability, job_id: str) -> JobView:
        """Cancel a job of this user: it ends ``cancelled`` now; a running container is killed by
        its agent at the next heartbeat (the answer names the ticket), and its result is refused."""
        with self._alloc, self.engine.begin() as conn:
            job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == job_id)).first()
            if job is None or job.user_hotkey != cap.user:
                raise Refused("not_found", f"no job {job_id} for user {cap.user}", status_code=404)
            if JobStatus(job.status).terminal:
                raise Refused("already_finished", f"job {job_id} is already {job.status}", status_code=409)
            if job.current_ticket is not None:
                conn.execute(db.tickets.update().where(db.tickets.c.id == job.current_ticket)
                             .values(active=False, retired_reason="cancelled"))
            conn.execute(db.jobs.update().where(db.jobs.c.id == job_id)
                         .values(status=JobStatus.cancelled.value, current_ticket=None))
            self._event(conn, job_id, job.attempt, JobStatus.cancelled, reporter=cap.user, detail="cancelled by user")
            self._dispatch(conn)
        self._notify()
        return self._get_job(cap, job_id)

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

    def _budget(self, conn: sa.Connection, cap: Capability) -> sa.Row:
        """The capability's row, if it may still start a job (organic or streaming); the caller
        spends it (``jobs_used + 1``) in the same transaction, once the job is sure to exist."""
        row = conn.execute(sa.select(db.capabilities).where(db.capabilities.c.id == cap.capability_id)).first()
        if row is None:
            raise CapabilityRefused("invalid_capability", "capability unknown to this validator", status_code=401)
        if row.jobs_used >= row.max_jobs:
            raise CapabilityRefused("over_budget", f"capability allows {row.max_jobs} jobs and all are used; "
                                    "request a new capability", status_code=403)
        return row

    # ------------------------------------------------------------------ jobs
    def register_job(self, cap: Capability, spec: JobSpec) -> Submitted:
        self.image_policy.check(spec.image)  # before the capability's budget is spent
        cls = self.classes.get(spec.executor_class)
        if cls is None:
            raise InvalidSpec(f"unknown executor class {spec.executor_class!r}; known: {sorted(self.classes)}")
        if spec.execution_timeout_s > cls.max_execution_s:
            raise InvalidSpec(f"execution_timeout_s {spec.execution_timeout_s} exceeds the {spec.executor_class} "
                              f"limit of {cls.max_execution_s} s")
        job_id = uuid.uuid4().hex
        with self._alloc, self.engine.begin() as conn:
            now = self.clock()  # inside the lock: queue order is arrival order
            row = self._budget(conn, cap)
            conn.execute(db.capabilities.update().where(db.capabilities.c.id == row.id)
                         .values(jobs_used=row.jobs_used + 1))
            conn.execute(db.jobs.insert().values(id=job_id, capability_id=cap.capability_id, user_hotkey=cap.user,
                                                 spec=spec.model_dump(mode="json"), executor_class=spec.executor_class,
                                                 status=JobStatus.received.value, created_ns=now, attempt=0,
                                                 max_wait_s=spec.max_wait_s, queued_ns=now))
            self._event(conn, job_id, 0, JobStatus.received)
            self._dispatch(conn, only_job=job_id)
            job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == job_id)).one()
            why = ""
            if job.current_ticket is None:
                why = self._queue_reason(conn, job)
                if spec.max_wait_s == 0:
                    self._reject(conn, job, why)
                else:
                    self._event(conn, job_id, 0, JobStatus.received, detail=f"queued: {why}")
            ticket = self._ticket_ref(conn, job)
        self._notify()
        if ticket is None and spec.max_wait_s == 0:
            raise Refused("no_miner_for_job", f"job {job_id} rejected: {why}", status_code=503)
        return Submitted(job_id=job_id, ticket=ticket, queue_reason=why)

    def _reject(self, conn: sa.Connection, job: sa.Row, why: str) -> None:
        failure = Failure(kind=FailureKind.rejection, reason="no_miner_for_job", message=why)
        conn.execute(db.jobs.update().where(db.jobs.c.id == job.id)
                     .values(status=JobStatus.rejected.value, failure=failure.model_dump(mode="json")))
        self._event(conn, job.id, job.attempt, JobStatus.rejected, detail=f"no_miner_for_job: {why}")

    def _queue_reason(self, conn: sa.Connection, job: sa.Row) -> str:
        _, why = self._pick_miner(conn, job.executor_class, exclude=set())
        return f"{why or 'no executor free for this job'}; {self._waiting_ahead(conn, job)} jobs ahead"

    def _waiting_ahead(self, conn: sa.Connection, job: sa.Row) -> int:
        return conn.execute(sa.select(sa.func.count()).select_from(db.jobs).where(
            db.jobs.c.status == JobStatus.received.value, db.jobs.c.current_ticket.is_(None),
            db.jobs.c.executor_class == job.executor_class, db.jobs.c.created_ns < job.created_ns,
            db.jobs.c.id != job.id)).scalar_one()

    def _ticket_ref(self, conn: sa.Connection, job: sa.Row) -> TicketRef | None:
        if job.current_ticket is None:
            return None
        t = conn.execute(sa.select(db.tickets).where(db.tickets.c.id == job.current_ticket)).one()
        return _ref(t.id, t.attempt, t.miner_hotkey, t.executor_class)

    def _dispatch(self, conn: sa.Connection, only_job: str | None = None) -> int:
        """Ticket waiting jobs, oldest first, while executors of their class are free; return how
        many got a ticket. Caller holds ``_alloc``."""
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
            miner, _ = self._pick_miner(conn, job.executor_class, exclude=self._failed_miners(conn, job.id))
            if miner is None:
                full.add(job.executor_class)
                continue
            ticket = self._issue_ticket(conn, job.id, job.attempt + 1, miner, job.executor_class)
            self._event(conn, job.id, ticket.attempt, JobStatus.received,
                        detail=f"ticket for miner {miner} (attempt {ticket.attempt})")
            issued += 1
        return issued

    def _failed_miners(self, conn: sa.Connection, job_id: str) -> set[str]:
        return set(conn.execute(sa.select(db.tickets.c.miner_hotkey).where(
            db.tickets.c.job_id == job_id, db.tickets.c.retired_reason.is_not(None))).scalars())

    def _active_tickets(self, conn: sa.Connection, miner: str) -> list[sa.Row]:
        return conn.execute(sa.select(db.tickets).where(db.tickets.c.miner_hotkey == miner,
                                                        db.tickets.c.active.is_(True))).all()

    def _retire(self, conn: sa.Connection, t: sa.Row, *, reason: str, charged: bool,
                evidence: str | None = None) -> None:
        """Give up attempt ``t``: free its executor, record the incident, requeue or fail the job."""
        now = self.clock()
        conn.execute(db.tickets.update().where(db.tickets.c.id == t.id).values(active=False, retired_reason=reason))
        conn.execute(db.incidents.insert().values(miner_hotkey=t.miner_hotkey, t_ns=now,
                                                  kind="miner" if charged else "fabric", reason=reason,
                                                  job_id=t.job_id, attempt=t.attempt, evidence=evidence))
        job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == t.job_id)).one()
        if job.current_ticket != t.id or JobStatus(job.status).terminal:
            return
        blame = "charged to the miner" if charged else "fabric incident, not charged"
        detail = f"attempt {t.attempt} on miner {t.miner_hotkey} lost: {reason} ({blame})"
        if t.attempt >= self.settings.max_attempts:
            failure = Failure(kind=FailureKind.horde_failure, reason="executor_disconnected", message=detail,
                              reporter="validator")
            conn.execute(db.jobs.update().where(db.jobs.c.id == job.id).values(
                status=JobStatus.horde_failed.value, current_ticket=None, failure=failure.model_dump(mode="json")))
            self._event(conn, job.id, t.attempt, JobStatus.horde_failed, detail=detail)
        else:
            conn.execute(db.jobs.update().where(db.jobs.c.id == job.id).values(
                status=JobStatus.received.value, current_ticket=None, queued_ns=self.clock()))
            self._event(conn, job.id, t.attempt, JobStatus.received, detail=f"{detail}; re-queued")

    def sweep(self) -> None:
        """Periodic: retire lost attempts, reject jobs that waited too long, serve the queue."""
        now = self.clock()
        live_after = now - int(self.settings.heartbeat_timeout_s * NS)
        changed = 0
        with self._alloc, self.engine.begin() as conn:
            for t in conn.execute(sa.select(db.tickets).where(db.tickets.c.active.is_(True))).all():
                m = conn.execute(sa.select(db.miners).where(db.miners.c.hotkey == t.miner_hotkey)).first()
                if m is None or (m.last_heartbeat_ns or 0) < live_after:
                    reason, charged = "missed_heartbeats", True
                elif t.fetched_ns is None and now > t.expires_ns:
                    reason, charged = "ticket_not_fetched", False
                elif t.deadline_ns is not None and now > t.deadline_ns:
                    reason, charged = "deadline_passed", True
                else:
                    continue
                self._retire(conn, t, reason=reason, charged=charged)
                changed += 1
            for job in conn.execute(sa.select(db.jobs).where(db.jobs.c.status == JobStatus.received.value,
                                                             db.jobs.c.current_ticket.is_(None))).all():
                if now - (job.queued_ns or job.created_ns) > job.max_wait_s * NS:
                    self._reject(conn, job, f"waited {job.max_wait_s} s; {self._queue_reason(conn, job)}")
                    changed += 1
            changed += self._dispatch(conn)
        if changed:
            self._notify()
        self.streams.sweep()
        self.scoring.tick()

    def start_sweeper(self) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(self.settings.sweep_interval_s):
                try:
                    self.sweep()
                except Exception:  # keep sweeping; a transient DB error must not stop re-ticketing
                    logging.getLogger("rayhorde.validator").exception("sweep failed")
        thread = threading.Thread(target=loop, name="sweeper", daemon=True)
        thread.start()
        return thread

    def _pick_miner(self, conn: sa.Connection, executor_class: str, *, exclude: set[str]) -> tuple[str | None, str]:
        now = self.clock()
        live_after = now - int(self.settings.heartbeat_timeout_s * NS)
        penalty_after = now - int(self.settings.incident_penalty_s * NS)
        offered = total_free = 0
        candidates: list[tuple[int, int, int, str]] = []
        banned = banned_miners(conn, now_ns=now, ban_s=self.settings.verification_ban_s)
        for m in conn.execute(sa.select(db.miners).where(db.miners.c.node_id.is_not(None))):
            n = int(m.executor_classes.get(executor_class, 0))
            if n == 0 or (m.last_heartbeat_ns or 0) < live_after or m.hotkey in banned:
                continue  # a miner that failed a verification gets no new work for a while
            busy = conn.execute(sa.select(sa.func.count()).select_from(db.tickets).where(
                db.tickets.c.miner_hotkey == m.hotkey, db.tickets.c.executor_class == executor_class,
                db.tickets.c.active.is_(True))).scalar_one()
            busy += conn.execute(sa.select(sa.func.count()).select_from(db.streams).where(  # a stream holds one too
                db.streams.c.miner_hotkey == m.hotkey, db.streams.c.executor_class == executor_class,
                db.streams.c.status.in_((JobStatus.accepted.value, JobStatus.streaming_ready.value)))).scalar_one()
            offered += n
            if n - busy > 0 and m.hotkey not in exclude:
                total_free += n - busy
                issued = conn.execute(sa.select(sa.func.count()).select_from(db.tickets)
                                      .where(db.tickets.c.miner_hotkey == m.hotkey)).scalar_one()
                # charged incidents (missed heartbeats, restarts, blown deadlines) lower a miner's
                # priority for a while; fabric incidents do not (DESIGN §1 point 8)
                charged = conn.execute(sa.select(sa.func.count()).select_from(db.incidents).where(
                    db.incidents.c.miner_hotkey == m.hotkey, db.incidents.c.kind == "miner",
                    db.incidents.c.t_ns >= penalty_after)).scalar_one()
                candidates.append((charged, -(n - busy), issued, m.hotkey))  # reliable, most free, least used
        if not candidates:
            return None, f"{total_free} of {offered} {executor_class} executors free on live admitted miners"
        return min(candidates)[3], ""

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
        msg = TicketFetch.model_validate(self._open(env, "ticket_current"))
        with self.engine.connect() as conn:
            t = conn.execute(sa.select(db.tickets).where(db.tickets.c.id == msg.ticket_id)).first()
            if t is None or t.miner_hotkey != env.signer:
                raise TicketRefused("wrong_miner", f"ticket {msg.ticket_id} is not addressed to {env.signer}",
                                    status_code=403)
            job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == t.job_id)).one()
            return bool(t.active and job.current_ticket == t.id)

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
        with self._alloc, self.engine.begin() as conn:
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
                self._dispatch(conn)
        if rep.status.terminal:  # watchers care about final states and new tickets, not progress
            self._notify()

    def report_result(self, job_id: str, env: SignedEnvelope) -> None:
        res = JobResult.model_validate(self._open(env, "job_result"))
        if res.job_id != job_id or res.miner_hotkey != env.signer:
            raise Refused("malformed", "result names another job or miner than its URL and signer", status_code=400)
        status = JobStatus(res.status)
        with self._alloc, self.engine.begin() as conn:
            self._current_ticket(conn, job_id, res.ticket_id, res.attempt, env.signer)
            failure = res.failure.model_copy(update={"reporter": env.signer}) if res.failure else None
            conn.execute(db.jobs.update().where(db.jobs.c.id == job_id).values(
                status=status.value, result_envelope=env.model_dump_json(), current_ticket=None,
                failure=failure.model_dump(mode="json") if failure else None))
            conn.execute(db.tickets.update().where(db.tickets.c.id == res.ticket_id).values(active=False))
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer)
                         .values(jobs_done=db.miners.c.jobs_done + 1))
            detail = failure.reason if failure else ""
            self._event(conn, job_id, res.attempt, status, reporter=env.signer, detail=detail)
            self._dispatch(conn)
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

    def watch(self, cap: Capability, known: dict[str, str | None], wait_s: float = 0) -> list[JobState]:
        """States of the jobs in ``known`` (job id -> ticket id the caller last saw), returned as
        soon as one of them is final or has a different ticket, or after ``wait_s``. One request
        lets a driver follow all its jobs (launching a task for every new ticket)."""
        deadline = time.monotonic() + min(wait_s, 30)
        ids = list(known)[:1000]
        while True:
            with self.engine.connect() as conn:  # one query for all of them: drivers follow many jobs
                t = db.tickets
                rows = conn.execute(
                    sa.select(db.jobs.c.id, db.jobs.c.status, t.c.id.label("ticket_id"), t.c.attempt,
                              t.c.miner_hotkey, t.c.executor_class)
                    .select_from(db.jobs.outerjoin(t, t.c.id == db.jobs.c.current_ticket))
                    .where(db.jobs.c.id.in_(ids), db.jobs.c.user_hotkey == cap.user)).all()
            states = [JobState(job_id=r.id, status=JobStatus(r.status), ticket=None
                               if JobStatus(r.status).terminal or r.ticket_id is None else
                               _ref(r.ticket_id, r.attempt, r.miner_hotkey, r.executor_class)) for r in rows]
            changed = any(st.status.terminal or (st.ticket.ticket_id if st.ticket else None) != known[st.job_id]
                          for st in states)
            remaining = deadline - time.monotonic()
            if changed or remaining <= 0:
                return states
            with self._changed:
                self._changed.wait(min(remaining, 1.0))

    def _get_job(self, cap: Capability, job_id: str) -> JobView:
        with self.engine.connect() as conn:
            job = conn.execute(sa.select(db.jobs).where(db.jobs.c.id == job_id)).first()
            if job is None or job.user_hotkey != cap.user:  # another user's job does not exist for you
                raise Refused("not_found", f"no job {job_id} for user {cap.user}", status_code=404)
            events = conn.execute(sa.select(db.job_events).where(db.job_events.c.job_id == job_id)
                                  .order_by(db.job_events.c.id)).all()
            return self._view(conn, job, events)

    def list_jobs(self, cap: Capability, limit: int = 100) -> list[JobView]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.jobs).where(db.jobs.c.user_hotkey == cap.user)
                                .order_by(db.jobs.c.created_ns.desc()).limit(limit)).all()
            return [self._view(conn, r, []) for r in rows]

    def _view(self, conn: sa.Connection, job: sa.Row, events: list[sa.Row]) -> JobView:
        result = None
        if job.result_envelope:
            result = JobResult.model_validate(SignedEnvelope.model_validate_json(job.result_envelope).payload)
        ticket = None if JobStatus(job.status).terminal else self._ticket_ref(conn, job)
        return JobView(
            job_id=job.id, status=JobStatus(job.status), executor_class=job.executor_class,
            miner_hotkey=job.miner_hotkey, attempt=job.attempt, created_ns=job.created_ns, ticket=ticket,
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
            incidents = [dict(r._mapping) for r in conn.execute(
                sa.select(db.incidents.c.miner_hotkey, db.incidents.c.kind, db.incidents.c.reason, db.incidents.c.job_id,
                          db.incidents.c.attempt, db.incidents.c.t_ns).order_by(db.incidents.c.id.desc()).limit(50))]
        return {"validator": self.hotkey.ss58, "gcs_address": self.settings.gcs_address(), "miners": out,
                "jobs": counts, "incidents": incidents, "verification": self.verification.summary()}


def _ref(ticket_id: str, attempt: int, miner: str, executor_class: str) -> TicketRef:
    return TicketRef(ticket_id=ticket_id, attempt=attempt, miner_hotkey=miner, executor_class=executor_class,
                     resources={miner_resource(miner): 0.001, executor_resource(executor_class): 1.0})
