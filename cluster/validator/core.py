"""validator-core: the composition root. No HTTP here (:mod:`.app`), and no decisions either.

It builds the shared pieces once (settings, the database engine, the allocation lock, the
change notifier, the envelope opener, the chain) and hands each desk the narrow collaborators it
needs; desks never import this module. Who depends on whom (each only on those below it;
``a | b``: never on each other):

    admission | organic | watchtower
                             miners joining and reporting; users' organic jobs; ending what
                             nobody entitled started on the public cluster
    probes | verification    validator-core's own requests; collecting and verifying answers
    streams                  streaming jobs on Ray Serve
    scoring                  scores and weights per cycle
    capabilities | placement users' budgets; which miner gets work, the queue
    ledger                   job history and incidents
    changes | envelopes | serve_rest | ray_state | firewall | limits   long polls; opening
                             signed envelopes; Serve's REST API; Ray's State API (nodes as Ray
                             sees them); the admitted-only firewall (nftables beside the desks);
                             what one client may load validator-core with, and its own uptime
    store                    the schema and its migrations

Every public method of a desk takes already-parsed input, opens the envelope once (the
boundary), and does its writes in one transaction. Every write that can free or take an
executor holds the allocation lock, so two submissions never take the same free executor and
the queue is served in order.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import sqlalchemy as sa

from cluster.chain import ChainBackend
from cluster.errors import ConfigError
from cluster.protocol.canonical import NS
from cluster.protocol.identity import Clock, Hotkey, system_clock
from cluster.protocol.images import ImagePolicy
from cluster.settings import ValidatorSettings, load_executor_classes
from cluster.validator import store as db
from cluster.validator.admission import AdmissionDesk
from cluster.validator.capabilities import CapabilityDesk
from cluster.validator.changes import Changes
from cluster.validator.envelopes import EnvelopeOpener
from cluster.validator.firewall import Firewall, NoFirewall, protected_ports
from cluster.validator.nftables import NftablesFirewall
from cluster.validator.ledger import Ledger
from cluster.validator.limits import Uptime
from cluster.validator.organic import OrganicDesk
from cluster.validator.placement import Placement
from cluster.validator.probes import ProbeDesk
from cluster.validator.ray_state import RayState
from cluster.validator.scoring import ScoringDesk
from cluster.validator.serve_rest import ServeRest
from cluster.validator.streams import StreamDesk
from cluster.validator.verification import BatchRunner, VerificationDesk, cluster_runner
from cluster.validator.watchtower import Watchtower, build_watchtower

log = logging.getLogger("rayhorde.validator")


class ValidatorCore:
    def __init__(self, settings: ValidatorSettings, *, hotkey: Hotkey, chain: ChainBackend, ray_token: str,
                 clock: Clock = system_clock) -> None:
        self.settings = settings
        self.hotkey = hotkey
        self.chain = chain
        self.clock = clock
        classes = load_executor_classes(settings.executor_classes_path)
        try:
            image_policy = ImagePolicy(settings.image_allow, settings.image_deny)
        except ValueError as exc:
            raise ConfigError(f"image_allow / image_deny: {exc}") from exc
        self.engine = engine = db.open_engine(settings.resolved_db_url())
        # a nonce older than the skew window is refused as stale anyway; keep a margin
        opener = EnvelopeOpener(db.DbNonceGuard(engine, keep_s=4 * settings.max_clock_skew_s + 60),
                                max_skew_s=settings.max_clock_skew_s, clock=clock)
        alloc = threading.Lock()  # held by every write that can free or take an executor
        self.changes = changes = Changes()
        self._stop = threading.Event()

        self.ledger = ledger = Ledger(clock, max_attempts=settings.max_attempts)
        self.uptime = Uptime(clock)  # a restart starts a new serving period; the app ticks it
        self.placement = placement = Placement(settings, hotkey=hotkey, ledger=ledger, clock=clock,
                                               uptime=self.uptime)
        self.capabilities = capabilities = CapabilityDesk(settings, hotkey=hotkey, engine=engine, opener=opener,
                                                          clock=clock)
        self.scoring = ScoringDesk(settings, engine=engine, chain=chain, clock=clock)
        self.probes = ProbeDesk(settings, engine=engine, clock=clock)
        self.streams = StreamDesk(settings, classes=classes, serve=self._serve(settings, ray_token),
                                  probe_keys=self.probes.client_keys, engine=engine, alloc=alloc, opener=opener,
                                  changes=changes, ledger=ledger, placement=placement, capabilities=capabilities,
                                  clock=clock)
        self.verification = VerificationDesk(settings, hotkey=hotkey, engine=engine, ledger=ledger,
                                             scoring=self.scoring, clock=clock, runner=self._runner(settings))
        self.admission = AdmissionDesk(settings, hotkey=hotkey, chain=chain, ray_token=ray_token, classes=classes,
                                       engine=engine, alloc=alloc, opener=opener, changes=changes, ledger=ledger,
                                       placement=placement, streams=self.streams, clock=clock,
                                       ray=self._ray_state(settings, ray_token), firewall=self._firewall(settings))
        self.organic = OrganicDesk(settings, hotkey=hotkey, classes=classes, image_policy=image_policy, engine=engine,
                                   alloc=alloc, opener=opener, changes=changes, ledger=ledger, placement=placement,
                                   capabilities=capabilities, clock=clock)
        self.watchtower: Watchtower | None = None if not settings.deploy_streams else build_watchtower(
            settings, ray_token, engine=engine, alloc=alloc, changes=changes, ledger=ledger, placement=placement,
            streams=self.streams, clock=clock,
            under_review=lambda: {c.node_id for c in self.admission.pending_node_losses()})
        if self.watchtower is not None:
            self.admission.end_node = self.watchtower.control.end_node  # an expelled miner's node ends too

    @staticmethod
    def _serve(settings: ValidatorSettings, ray_token: str) -> ServeRest | None:
        if not settings.deploy_streams:
            return None  # no Ray head to deploy to (unit tests)
        return ServeRest(settings.dashboard_url(), ray_token, http_port=settings.resolved_serve_http_port(),
                         request_timeout_s=settings.serve_request_timeout_s)

    @staticmethod
    def _firewall(settings: ValidatorSettings) -> Firewall:
        if settings.firewall == "nftables":
            return NftablesFirewall(protected_ports(settings), table=settings.firewall_table)
        return NoFirewall()

    @staticmethod
    def _ray_state(settings: ValidatorSettings, ray_token: str) -> RayState | None:
        if not settings.deploy_streams:
            return None  # no Ray head to ask (unit tests): node_lost reports are taken as said
        return RayState(settings.dashboard_url(), ray_token)

    @staticmethod
    def _runner(settings: ValidatorSettings) -> BatchRunner | None:
        if not settings.verification_address:
            return None  # collect and check receipt chains only
        if settings.verification_token_path is None:
            raise ConfigError("verification_address needs verification_token_path (that cluster's Ray token)")
        return cluster_runner(settings.verification_address, settings.verification_token_path.read_text().strip(),
                              str(settings.home / "verification-driver"), settings.verifier_factory,
                              keep_warm_s=settings.verify_keep_warm_s)

    # ------------------------------------------------------------------ periodic
    def sweep(self) -> None:
        """Expel miners that may no longer serve, retire lost attempts, serve the queue, end
        streams, close the scoring cycle, check node_lost reports against Ray (last: it may wait
        on the dashboard)."""
        self.admission.enforce()  # first: a banned or deregistered miner gets nothing more
        self.organic.sweep()
        self.streams.sweep()
        self.scoring.tick()
        self.admission.sweep()

    def start(self) -> list[threading.Thread]:
        """Apply the firewall; start the background loops: the sweeper, verification and probes
        (until :meth:`stop`)."""
        self.admission.sync_firewall()  # the admitted miners of before a restart, and nobody else
        def sweeper() -> None:
            while not self._stop.wait(self.settings.sweep_interval_s):
                try:
                    self.sweep()
                except Exception:  # keep sweeping; a transient DB error must not stop re-ticketing
                    log.exception("sweep failed")
        thread = threading.Thread(target=sweeper, name="sweeper", daemon=True)
        thread.start()
        threads = [thread, self.verification.start(self._stop)]
        if self.watchtower is not None and self.settings.watch_interval_s > 0:
            threads.append(self.watchtower.start(self._stop))  # its own thread: never slows the sweeper
        probes = self.probes.start(self._stop)
        return threads if probes is None else [*threads, probes]

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ reading
    def cluster_status(self) -> dict[str, Any]:
        """Miners, job counts, the last incidents and verification counts: the operator's view."""
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
            incidents = self.ledger.recent(conn, 50)
        return {"validator": self.hotkey.ss58, "gcs_address": self.settings.gcs_address(), "miners": out,
                "jobs": counts, "incidents": incidents, "verification": self.verification.summary()}
