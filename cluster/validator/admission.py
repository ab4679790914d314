"""validator-core's admission: which miners join, and what it hears from them while they serve.

    challenge     a single-use nonce for a miner hotkey, valid ``challenge_ttl_s``.
    join          the miner signs the challenge back with what it offers; admitted only if the
                  hotkey is registered on the subnet and not banned, it runs this validator's
                  rayhorde, Ray and Python versions, and offers known executor classes (1..64
                  each). It gets the Ray address, token and resources to start its node with.
                  A miner that joins again restarted its agent: whatever it ran is lost
                  (a charged incident) and goes back to the queue.
    node_started  its Ray node is up: its executors count as capacity from now on.
    node_lost     its agent saw the Ray node die: the node's attempts and streams end as a
                  fabric incident, not charged to the miner (its agent still answers).
    heartbeat     liveness (see :mod:`.placement`); the answer names the tickets the miner
                  still runs that are no longer current, for its agent to kill.
    preflight     ``rayhorde miner check``: is the hotkey registered and not banned, and can
                  validator-core open TCP connections to the miner's Ray and proxy ports. Only
                  to the address the request came from (validator-core is no port scanner for
                  hire), at most 16 ports, each tried once.
"""

from __future__ import annotations

import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from cluster.chain import ChainBackend
from cluster.errors import AdmissionRefused
from cluster.protocol.canonical import NS
from cluster.protocol.envelope import SignedEnvelope
from cluster.protocol.identity import Clock, Hotkey, is_ss58
from cluster.protocol.messages import (
    Challenge, ChallengeRequest, Heartbeat, JoinAccepted, JoinRequest, NodeLost, NodeStarted, Preflight,
    PreflightAnswer, executor_resource, miner_resource,
)
from cluster.protocol.version import local_versions
from cluster.settings import ExecutorClass, ValidatorSettings
from cluster.validator import store as db
from cluster.validator.changes import Changes
from cluster.validator.envelopes import EnvelopeOpener
from cluster.validator.ledger import Ledger
from cluster.validator.placement import Placement, admitted
from cluster.validator.streams import StreamDesk

MATCHED_VERSIONS = ("rayhorde", "ray", "python")  # a miner must run exactly these versions of the validator's


class AdmissionDesk:
    def __init__(self, settings: ValidatorSettings, *, hotkey: Hotkey, chain: ChainBackend, ray_token: str,
                 classes: dict[str, ExecutorClass], engine: sa.Engine, alloc: threading.Lock, opener: EnvelopeOpener,
                 changes: Changes, ledger: Ledger, placement: Placement, streams: StreamDesk, clock: Clock) -> None:
        self.settings = settings
        self.hotkey = hotkey
        self.chain = chain
        self.ray_token = ray_token
        self.classes = classes
        self.engine = engine
        self.alloc = alloc  # held by every write that can free or take an executor
        self.opener = opener
        self.changes = changes
        self.ledger = ledger
        self.placement = placement
        self.streams = streams
        self.clock = clock

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
        req = JoinRequest.model_validate(self.opener.open(env, "admission_join"))
        miner = env.signer
        if req.validator != self.hotkey.ss58:
            raise AdmissionRefused("wrong_validator", f"join is addressed to {req.validator}, this validator is "
                                   f"{self.hotkey.ss58}", status_code=403)
        now = self.clock()
        self._take_challenge(req.challenge, miner, now)
        self._check_eligible(miner)
        ours = local_versions()
        for name in MATCHED_VERSIONS:
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
        with self.alloc, self.engine.begin() as conn:
            for t in self._active_tickets(conn, miner):  # a restarted agent lost whatever it ran
                self.ledger.retire(conn, t, reason="agent_restarted", charged=True)
            ended = self.streams.miner_lost(conn, miner, reason="agent_restarted", charged=True)
            conn.execute(db.miners.delete().where(db.miners.c.hotkey == miner))
            conn.execute(db.miners.insert().values(hotkey=miner, admitted_ns=now, executor_classes=req.executor_classes,
                                                   proxy_url=req.proxy_url, versions=req.versions, node_id=None,
                                                   last_heartbeat_ns=now, jobs_done=0))
        if ended:
            self.streams.reconcile()
            self.changes.notify()
        resources = {miner_resource(miner): 1.0}
        resources.update({executor_resource(c): float(n) for c, n in req.executor_classes.items()})
        return JoinAccepted(gcs_address=self.settings.gcs_address(), ray_token=self.ray_token, resources=resources,
                            heartbeat_interval_s=self.settings.heartbeat_interval_s,
                            validator_hotkey=self.hotkey.ss58,
                            serve_http_port=self.settings.resolved_serve_http_port())

    def _take_challenge(self, nonce: str, miner: str, now: int) -> None:
        """Mark the challenge used, if it was issued to ``miner``, unused and unexpired."""
        with self.engine.begin() as conn:
            ch = conn.execute(sa.select(db.challenges).where(db.challenges.c.nonce == nonce)).first()
            if ch is None or ch.miner_hotkey != miner:
                raise AdmissionRefused("bad_challenge", "unknown challenge for this hotkey; ask for a new one",
                                       status_code=403)
            if ch.used:
                raise AdmissionRefused("bad_challenge", "challenge already used; ask for a new one", status_code=403)
            if now > ch.expires_ns:
                raise AdmissionRefused("bad_challenge", f"challenge expired {(now - ch.expires_ns) / NS:.1f} s ago; "
                                       "ask for a new one", status_code=403)
            taken = conn.execute(db.challenges.update().where(db.challenges.c.nonce == nonce,
                                                              db.challenges.c.used.is_(False)).values(used=True))
            if taken.rowcount != 1:  # a concurrent join won the race for this challenge
                raise AdmissionRefused("bad_challenge", "challenge already used; ask for a new one", status_code=403)

    def preflight(self, env: SignedEnvelope, peer_address: str, *, connect_timeout_s: float = 3) -> PreflightAnswer:
        req = Preflight.model_validate(self.opener.open(env, "admission_preflight"))
        if req.validator != self.hotkey.ss58:
            raise AdmissionRefused("wrong_validator", f"preflight is addressed to {req.validator}, this validator is "
                                   f"{self.hotkey.ss58}", status_code=403)
        if req.ports and req.address != peer_address:
            raise AdmissionRefused("address_mismatch", f"ports can only be checked on the address this request comes "
                                   f"from ({peer_address}), not {req.address}: run the check on the miner host, "
                                   "without a proxy or NAT in between", status_code=403)
        if any(not 1 <= p <= 65535 for p in req.ports):
            raise AdmissionRefused("malformed", "ports must be between 1 and 65535", status_code=400)
        registered, banned, detail = True, False, ""
        try:
            self._check_eligible(env.signer)
        except AdmissionRefused as exc:
            registered, banned, detail = exc.reason != "not_registered", exc.reason == "banned", exc.message

        def reach(port: int) -> bool:
            try:
                with socket.create_connection((req.address, port), timeout=connect_timeout_s):
                    return True
            except OSError:
                return False

        ports = sorted(set(req.ports))
        with ThreadPoolExecutor(max_workers=max(1, len(ports))) as pool:
            reachable = dict(zip(ports, pool.map(reach, ports)))
        return PreflightAnswer(registered=registered, banned=banned, detail=detail, reachable=reachable,
                               connect_timeout_s=connect_timeout_s, validator_time_ns=self.clock())

    def _check_eligible(self, miner: str) -> None:
        mg = self.chain.metagraph(self.settings.netuid)
        if mg.neuron(miner) is None:
            raise AdmissionRefused("not_registered", f"hotkey {miner} is not registered on subnet {mg.netuid} "
                                   f"(metagraph at block {mg.block}); register it, then join again", status_code=403)
        if miner in self.settings.banned_hotkeys:
            raise AdmissionRefused("banned", f"hotkey {miner} is banned by this validator", status_code=403)

    def node_started(self, env: SignedEnvelope) -> None:
        msg = NodeStarted.model_validate(self.opener.open(env, "node_started"))
        with self.alloc, self.engine.begin() as conn:
            admitted(conn, env.signer)
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer)
                         .values(node_id=msg.node_id, last_heartbeat_ns=self.clock()))
            issued = self.placement.dispatch(conn)  # new capacity
        if issued:
            self.changes.notify()

    def node_lost(self, env: SignedEnvelope) -> None:
        """The agent saw its Ray node die: a fabric incident, not charged (its agent still answers)."""
        msg = NodeLost.model_validate(self.opener.open(env, "node_lost"))
        with self.alloc, self.engine.begin() as conn:
            miner = admitted(conn, env.signer)
            if miner.node_id is not None and miner.node_id != msg.node_id:
                return  # a late report about a node already replaced: the current one's attempts stand
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer).values(node_id=None))
            for t in self._active_tickets(conn, env.signer):
                self.ledger.retire(conn, t, reason="ray_node_lost", charged=False, evidence=env.model_dump_json())
            self.streams.miner_lost(conn, env.signer, reason="ray_node_lost", charged=False,
                                    evidence=env.model_dump_json())
            self.placement.dispatch(conn)
        self.streams.reconcile()  # the dead node's apps leave Serve's config
        self.changes.notify()

    def heartbeat(self, env: SignedEnvelope) -> list[str]:
        """Record liveness; answer with the tickets the miner still runs that are no longer
        current (cancelled by their user, or retired and given to another miner): kill those."""
        beat = Heartbeat.model_validate(self.opener.open(env, "heartbeat"))
        with self.engine.begin() as conn:
            admitted(conn, env.signer)
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer)
                         .values(last_heartbeat_ns=self.clock()))
            if not beat.running_tickets:
                return []
            return list(conn.execute(sa.select(db.tickets.c.id).where(
                db.tickets.c.id.in_(beat.running_tickets[:1000]), db.tickets.c.miner_hotkey == env.signer,
                db.tickets.c.active.is_(False))).scalars())

    @staticmethod
    def _active_tickets(conn: sa.Connection, miner: str) -> list[sa.Row]:
        return conn.execute(sa.select(db.tickets).where(db.tickets.c.miner_hotkey == miner,
                                                        db.tickets.c.active.is_(True))).all()
