"""validator-core's streaming jobs: place, deploy, announce, end.

    deploy(spec)  whitelist + options + class checked; a miner with a free executor of the
                  class picked (streams hold an executor like organic attempts); row written
                  ``accepted``; the Serve REST config re-applied with the new app, pinned to
                  that miner's node under ``/jobs/<job_id>``.
    heartbeat     the miner's agent learns the streams placed on it (``StreamAssignment``),
                  asks the app for its job key over loopback and signs readiness.
    ready(env)    the miner-signed readiness {job_id, job_key, proxy_url} checked once, here,
                  and stored verbatim -> ``streaming_ready``; clients read it with the view.
    end           the client terminates (``completed``), the time limit passes (``completed``),
                  the app fails to deploy or never gets ready (``horde_failed``), or the
                  miner's node / agent is lost (``horde_failed``; a dead node under a live agent
                  is a fabric incident, not charged to the miner; so is a silent miner, up to an
                  allowance, see :mod:`.ledger`).
                  The app leaves the Serve config; the agent drops the route at its next heartbeat.

Serve is driven only through its REST API (:mod:`.serve_rest`): validator-core never becomes a
Ray driver, so it never unpickles anything the cluster produced.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Callable

import sqlalchemy as sa

from cluster.errors import InvalidSpec, Refused, ServiceUnavailable
from cluster.protocol.canonical import NS
from cluster.protocol.envelope import SignedEnvelope
from cluster.protocol.identity import Clock
from cluster.protocol.jobs import Failure, FailureKind, JobStatus, StatusEvent
from cluster.protocol.keys import PublicKey
from cluster.protocol.messages import Capability, miner_resource
from cluster.protocol.streams import READY_KIND, StreamAssignment, StreamReady, StreamSpec, StreamView
from cluster.protocol.whitelist import Whitelist
from cluster.settings import ExecutorClass, ValidatorSettings
from cluster.validator import store as db
from cluster.validator.capabilities import CapabilityDesk
from cluster.validator.changes import Changes
from cluster.validator.envelopes import EnvelopeOpener
from cluster.validator.ledger import UNREACHABLE, Ledger, blame
from cluster.validator.placement import ACTIVE_STREAM, Placement
from cluster.validator.serve_rest import BUILDER, ServeRest

log = logging.getLogger("rayhorde.validator")
ProbeKeys = Callable[[str, list[PublicKey]], list[PublicKey]]  # (job id, user keys) -> keys with the probe key


def client_keys(s: sa.Row) -> list[PublicKey]:
    """Who may call a streaming job: the keys its app was deployed with (the miner's proxy and the
    collector use the same list; a whitelist edited later does not change a running job's)."""
    init = ((s.serve_app or {}).get("args") or {}).get("init") or {}
    if "client_keys" in init:
        return [PublicKey.model_validate(k) for k in init["client_keys"]]
    return StreamSpec.model_validate(s.spec).client_keys


def route_prefix(job_id: str) -> str:
    return f"/jobs/{job_id}"


class StreamDesk:
    def __init__(self, settings: ValidatorSettings, *, classes: dict[str, ExecutorClass], serve: ServeRest | None,
                 probe_keys: ProbeKeys, engine: sa.Engine, alloc: threading.Lock, opener: EnvelopeOpener,
                 changes: Changes, ledger: Ledger, placement: Placement, capabilities: CapabilityDesk,
                 clock: Clock) -> None:
        self.settings = settings
        self.classes = classes
        self.whitelist = Whitelist.load(settings.whitelist_path)
        self.serve = serve  # None: this validator has no Ray head to deploy to (unit tests)
        self.probe_keys = probe_keys  # validator-core's probe key among a verifiable app's client keys
        self.engine = engine
        self.alloc = alloc  # held by every write that can free or take an executor
        self.opener = opener
        self.changes = changes
        self.ledger = ledger
        self.placement = placement
        self.capabilities = capabilities
        self.clock = clock

    # ------------------------------------------------------------------ client side
    def deploy(self, cap: Capability, spec: StreamSpec) -> StreamView:
        entry = self.whitelist.entry(spec.app, spec.version)  # AppRefused: app_not_whitelisted
        unknown = sorted(set(spec.options) - set(entry.options))
        if unknown:
            raise InvalidSpec(f"app {spec.app} does not take options {unknown}; it takes {entry.options or 'none'}")
        if spec.executor_class not in self.classes:
            raise InvalidSpec(f"unknown executor class {spec.executor_class!r}; known: {sorted(self.classes)}")
        if spec.max_duration_s > self.settings.stream_max_duration_s:
            raise InvalidSpec(f"max_duration_s {spec.max_duration_s} exceeds this validator's limit of "
                              f"{self.settings.stream_max_duration_s:g} s")
        job_id = "s" + uuid.uuid4().hex
        with self.alloc, self.engine.begin() as conn:
            now = self.clock()
            row = self.capabilities.budget(conn, cap)
            miner, why = self.placement.pick_miner(conn, spec.executor_class, exclude=set())
            if miner is None:
                raise Refused("no_miner_for_job", f"no miner can take a {spec.executor_class} stream now: {why}; "
                              "retry later", status_code=409)  # 409: the market is full, validator-core is well
            self.capabilities.spend(conn, row)
            # who may call it, fixed here for the job's life: its user's keys, and on a verifiable
            # app validator-core's probe key among them (:mod:`.probes`)
            keys = self.probe_keys(job_id, spec.client_keys) if entry.verifiable else spec.client_keys
            init = {**entry.init, **spec.options, "job_id": job_id, "miner_hotkey": miner,
                    "client_keys": [k.model_dump() for k in keys],
                    "route_prefix": route_prefix(job_id),
                    "max_skew_s": self.settings.max_clock_skew_s}
            if entry.weights_sha256:
                init["weights_sha256"] = entry.weights_sha256  # the app refuses other weights at start
            app = {"name": job_id, "route_prefix": route_prefix(job_id), "import_path": BUILDER,
                   "args": {"app": entry.app, "name": entry.name, "pin_resource": miner_resource(miner),
                            "num_cpus": entry.num_cpus, "memory_mb": entry.memory_mb, "env": entry.env,
                            "max_ongoing_requests": entry.max_ongoing_requests, "init": init}}
            conn.execute(db.streams.insert().values(
                id=job_id, capability_id=cap.capability_id, user_hotkey=cap.user, spec=spec.model_dump(mode="json"),
                executor_class=spec.executor_class, status=JobStatus.accepted.value, created_ns=now,
                miner_hotkey=miner, deadline_ns=now + spec.max_duration_s * NS, serve_app=app))
            self.ledger.event(conn, job_id, 1, JobStatus.accepted, detail=f"placed on miner {miner}")
        self.reconcile()
        return self.get(cap, job_id)

    def terminate(self, cap: Capability, job_id: str) -> StreamView:
        with self.alloc, self.engine.begin() as conn:
            s = self._owned(conn, cap, job_id)
            if JobStatus(s.status).terminal:
                raise Refused("already_finished", f"streaming job {job_id} is already {s.status}", status_code=409)
            self._end(conn, s, JobStatus.completed, "terminated by the client", reporter=cap.user)
        self.reconcile()
        return self.get(cap, job_id)

    def get(self, cap: Capability, job_id: str, wait_s: float = 0) -> StreamView:
        """The stream as recorded; ``wait_s`` > 0 waits (max 30 s) until it is ready or ended."""
        return self.changes.poll(lambda: self._read(cap, job_id), _settled, wait_s)

    async def get_async(self, cap: Capability, job_id: str, wait_s: float = 0) -> StreamView:
        """:meth:`get` for the HTTP door: the wait holds no thread."""
        return await self.changes.apoll(lambda: self._read(cap, job_id), _settled, wait_s)

    def _read(self, cap: Capability, job_id: str) -> StreamView:
        with self.engine.connect() as conn:
            s = self._owned(conn, cap, job_id)
            events = conn.execute(sa.select(db.job_events).where(db.job_events.c.job_id == job_id)
                                  .order_by(db.job_events.c.id)).all()
        return _view(s, events)

    def list(self, cap: Capability, limit: int = 100) -> list[StreamView]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.streams).where(db.streams.c.user_hotkey == cap.user)
                                .order_by(db.streams.c.created_ns.desc()).limit(limit)).all()
        return [_view(r, []) for r in rows]

    @staticmethod
    def _owned(conn: sa.Connection, cap: Capability, job_id: str) -> sa.Row:
        s = conn.execute(sa.select(db.streams).where(db.streams.c.id == job_id)).first()
        if s is None or s.user_hotkey != cap.user:
            raise Refused("not_found", f"no streaming job {job_id} for user {cap.user}", status_code=404)
        return s

    # ------------------------------------------------------------------ miner side
    def assigned(self, miner: str) -> list[StreamAssignment]:
        """The active streams placed on ``miner`` (sent with every heartbeat answer)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.streams).where(db.streams.c.miner_hotkey == miner,
                                                            db.streams.c.status.in_(ACTIVE_STREAM))).all()
        return [StreamAssignment(job_id=r.id, route_prefix=route_prefix(r.id),
                                 client_keys=client_keys(r),
                                 deadline_ns=r.deadline_ns,
                                 ready=r.ready_envelope is not None) for r in rows]

    def ready(self, job_id: str, env: SignedEnvelope) -> None:
        msg = StreamReady.model_validate(self.opener.open(env, READY_KIND))
        if msg.job_id != job_id:
            raise Refused("malformed", f"readiness names job {msg.job_id}, posted for {job_id}", status_code=400)
        with self.alloc, self.engine.begin() as conn:
            s = conn.execute(sa.select(db.streams).where(db.streams.c.id == job_id)).first()
            if s is None or s.miner_hotkey != env.signer:
                raise Refused("wrong_miner", f"streaming job {job_id} is not placed on {env.signer}", status_code=403)
            if s.status != JobStatus.accepted.value:
                raise Refused("stream_closed", f"streaming job {job_id} is {s.status}; readiness refused",
                              status_code=409)
            conn.execute(db.streams.update().where(db.streams.c.id == job_id).values(
                status=JobStatus.streaming_ready.value, ready_envelope=env.model_dump_json()))
            self.ledger.event(conn, job_id, 1, JobStatus.streaming_ready, reporter=env.signer,
                              detail=f"serving at {msg.proxy_url}", evidence=env.model_dump_json())
        self.changes.notify()

    def miner_lost(self, conn: sa.Connection, miner: str, *, reason: str, charged: bool,
                   evidence: str | None = None) -> int:
        """End every active stream of ``miner``: its node (or the whole miner) is gone. Caller
        holds the allocation lock and the transaction; the Serve config is re-applied by the caller."""
        n = 0
        for s in conn.execute(sa.select(db.streams).where(db.streams.c.miner_hotkey == miner,
                                                          db.streams.c.status.in_(ACTIVE_STREAM))).all():
            self.ledger.incident(conn, miner, reason, charged=charged, job_id=s.id, attempt=1, evidence=evidence)
            self._end(conn, s, JobStatus.horde_failed, f"{reason} ({blame(charged)})",
                      failure_reason="executor_disconnected")
            n += 1
        return n

    def _end(self, conn: sa.Connection, s: sa.Row, status: JobStatus, detail: str, *, reporter: str = "validator",
             failure_reason: str | None = None) -> None:
        failure = None
        if status != JobStatus.completed:
            failure = Failure(kind=FailureKind.horde_failure, reason=failure_reason or "executor_spinup_failed",
                              message=detail, reporter="validator").model_dump(mode="json")
        conn.execute(db.streams.update().where(db.streams.c.id == s.id).values(status=status.value, failure=failure))
        self.ledger.event(conn, s.id, 1, status, reporter=reporter, detail=detail)

    # ------------------------------------------------------------------ periodic
    def sweep(self) -> None:
        """Time limits, deploy failures and deploy timeouts; then make Serve match the table."""
        now = self.clock()
        changed = 0
        statuses: dict[str, dict[str, str]] | None = None
        with self.alloc, self.engine.begin() as conn:
            for s in conn.execute(sa.select(db.streams).where(db.streams.c.status.in_(ACTIVE_STREAM))).all():
                m = conn.execute(sa.select(db.miners).where(db.miners.c.hotkey == s.miner_hotkey)).first()
                if s.deadline_ns is not None and now > s.deadline_ns:
                    self._end(conn, s, JobStatus.completed, "time limit reached (max_duration_s)")
                elif self.placement.is_lost(m, now):
                    charged = self.ledger.unreachable_charged(conn, s.miner_hotkey, free=self.settings.unreachable_free,
                                                              window_s=self.settings.incident_penalty_s)
                    changed += self.miner_lost(conn, s.miner_hotkey, reason=UNREACHABLE, charged=charged)
                    continue
                elif s.status == JobStatus.accepted.value:
                    if statuses is None and self.serve is not None:
                        try:
                            statuses = self.serve.statuses()
                        except ServiceUnavailable as exc:
                            log.warning("%s", exc)
                            statuses = {}
                    st = (statuses or {}).get(s.id, {})
                    if st.get("status") == "DEPLOY_FAILED":
                        reason, why = _deploy_failure(st["message"])
                        self._end(conn, s, JobStatus.horde_failed, f"the app failed to start: {why}",
                                  failure_reason=reason)
                    elif now - s.created_ns > self.settings.stream_deploy_timeout_s * NS:
                        self._end(conn, s, JobStatus.horde_failed, f"not ready within "
                                  f"{self.settings.stream_deploy_timeout_s:g} s (stream_deploy_timeout_s)")
                    else:
                        continue
                else:
                    continue
                changed += 1
        if changed:
            self.changes.notify()
        self.reconcile()

    def reconcile(self) -> None:
        """Make Serve's REST-managed apps exactly the active streams (a no-op when they are)."""
        if self.serve is None:
            return
        with self.engine.connect() as conn:
            apps = [r.serve_app for r in conn.execute(sa.select(db.streams.c.serve_app).where(
                db.streams.c.status.in_(ACTIVE_STREAM)))]
        try:
            self.serve.apply(apps)
        except ServiceUnavailable as exc:  # the next sweep tries again
            log.warning("could not update Serve: %s", exc)


def _deploy_failure(message: str) -> tuple[str, str]:
    """(reason, the telling line) from Serve's DEPLOY_FAILED message (summary + tracebacks)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "weights_digest_mismatch" in ln:
            return "weights_digest_mismatch", ln[-500:]
    return "executor_spinup_failed", (lines[-1] if lines else "no message")[-500:]


def _view(s: sa.Row, events: list[sa.Row]) -> StreamView:
    spec = StreamSpec.model_validate(s.spec)
    return StreamView(
        job_id=s.id, status=JobStatus(s.status), app=spec.app, version=spec.version, executor_class=s.executor_class,
        miner_hotkey=s.miner_hotkey, route_prefix=route_prefix(s.id), created_ns=s.created_ns,
        deadline_ns=s.deadline_ns,
        readiness=SignedEnvelope.model_validate_json(s.ready_envelope).model_dump(mode="json")
        if s.ready_envelope else None,
        failure=Failure.model_validate(s.failure) if s.failure else None,
        history=[StatusEvent(status=JobStatus(e.status), t_ns=e.t_ns, attempt=e.attempt, reporter=e.reporter,
                             detail=e.detail) for e in events])


def _settled(view: StreamView) -> bool:
    """What a long-poll on a stream waits for: ready, or ended."""
    return view.status != JobStatus.accepted
