"""validator-core's admission: which miners join, and what it hears from them while they serve.

    challenge     a single-use nonce for a miner hotkey, valid ``challenge_ttl_s``.
    join          the miner signs the challenge back with what it offers; admitted only if the
                  hotkey is registered on the subnet and not banned, it runs this validator's
                  rayhorde, Ray and Python versions, and offers known executor classes (1..64
                  each). It gets the Ray address, token and resources to start its node with.
                  A miner that joins again restarted its agent: whatever it ran is lost
                  (a charged incident) and goes back to the queue.
    node_started  its Ray node is up: its executors count as capacity from now on.
    node_lost     its agent saw the Ray node die: the node's attempts and streams end at once
                  as a fabric incident (``ray_node_lost``), and the report is then checked
                  against Ray's own view of the node (see :meth:`AdmissionDesk.sweep`): a node
                  Ray still reports ALIVE ``node_lost_confirm_s`` later was not lost, and the
                  report is charged to the miner (``node_lost_but_alive``).
    heartbeat     liveness (see :mod:`.placement`); the answer names the tickets the miner
                  still runs that are no longer current, for its agent to kill.
    preflight     ``rayhorde miner check``: is the hotkey registered and not banned, and can
                  validator-core open TCP connections to the miner's Ray and proxy ports. Only
                  to the address the request came from (validator-core is no port scanner for
                  hire), at most 16 ports, each tried once.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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
from cluster.validator.placement import ACTIVE_STREAM, Placement, admitted
from cluster.validator.ray_state import RayState
from cluster.validator.streams import StreamDesk

log = logging.getLogger("rayhorde.validator")
MATCHED_VERSIONS = ("rayhorde", "ray", "python")  # a miner must run exactly these versions of the validator's
NODE_LOST = "ray_node_lost"  # incidents.reason of work lost with a node its agent reported dead (fabric)
NODE_LOST_BUT_ALIVE = "node_lost_but_alive"  # ... of a node_lost report Ray contradicted (charged)
NODE_LOST_UNCONFIRMED = "ray_node_lost_unconfirmed"  # ... of one Ray could not be asked about (fabric)


@dataclass(frozen=True)
class NodeLossCheck:
    """A node_lost report waiting for Ray's own view of the node."""
    miner: str
    node_id: str
    deadline_ns: int  # still ALIVE in Ray at this time: the report is charged
    lost: tuple[tuple[str, int], ...]  # (job id, attempt) of each attempt and stream it ended
    report: str  # the signed report, as JSON: the evidence


class AdmissionDesk:
    def __init__(self, settings: ValidatorSettings, *, hotkey: Hotkey, chain: ChainBackend, ray_token: str,
                 classes: dict[str, ExecutorClass], engine: sa.Engine, alloc: threading.Lock, opener: EnvelopeOpener,
                 changes: Changes, ledger: Ledger, placement: Placement, streams: StreamDesk, clock: Clock,
                 ray: RayState | None = None) -> None:
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
        self.ray = ray  # Ray's own view of the nodes; None: no head to ask (unit tests), reports are taken as said
        self._checks: dict[tuple[str, str], NodeLossCheck] = {}  # (miner, node id) -> its pending check
        self._checks_lock = threading.Lock()

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
        """The agent says its Ray node died: its attempts and streams end now (the agent no longer
        runs them, whatever the truth) as a fabric incident, and the report waits for Ray's view
        (:meth:`sweep`) before it is known to be true."""
        msg = NodeLost.model_validate(self.opener.open(env, "node_lost"))
        evidence = env.model_dump_json()
        with self.alloc, self.engine.begin() as conn:
            miner = admitted(conn, env.signer)
            if miner.node_id is not None and miner.node_id != msg.node_id:
                return  # a late report about a node already replaced: the current one's attempts stand
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer).values(node_id=None))
            tickets = self._active_tickets(conn, env.signer)
            streams = conn.execute(sa.select(db.streams.c.id).where(
                db.streams.c.miner_hotkey == env.signer, db.streams.c.status.in_(ACTIVE_STREAM))).scalars().all()
            lost = [(t.job_id, t.attempt) for t in tickets] + [(stream_id, 1) for stream_id in streams]
            for t in tickets:
                self.ledger.retire(conn, t, reason=NODE_LOST, charged=False, evidence=evidence)
            self.streams.miner_lost(conn, env.signer, reason=NODE_LOST, charged=False, evidence=evidence)
            self.placement.dispatch(conn)
        if miner.node_id is not None and self.ray is not None:  # a report about the node it counts as up
            check = NodeLossCheck(env.signer, msg.node_id, self.clock() + int(self.settings.node_lost_confirm_s * NS),
                                  tuple(lost), evidence)
            with self._checks_lock:
                self._checks.setdefault((check.miner, check.node_id), check)
        self.streams.reconcile()  # the dead node's apps leave Serve's config
        self.changes.notify()

    def sweep(self) -> None:
        """Check each pending node_lost report against Ray's own view of the node (the head's GCS,
        over the dashboard's State API). The report is a signed claim; Ray's view is what the claim
        is about, so the report is charged only when Ray contradicts it:

          DEAD, or unknown to Ray   confirmed: the fabric incident stands.
          ALIVE                     maybe not yet noticed (Ray declares a killed node dead only after
                                    its health checks fail for ~15 s): asked again each sweep; still
                                    ALIVE ``node_lost_confirm_s`` after the report: the node was not
                                    lost, the miner dropped its work, and each attempt and stream it
                                    ended gets a charged ``node_lost_but_alive`` incident (one about
                                    the miner if it ended none), the signed report its evidence.
          Ray could not be asked    (dashboard down, timeout, malformed answer): never an accusation
                                    on missing data. Asked again each sweep; still unanswered at the
                                    deadline: a fabric ``ray_node_lost_unconfirmed`` incident about
                                    the miner says the report was taken unchecked.

        Pending checks live in memory: after a validator-core restart a report is taken as said
        (the miner is favoured, never wrongly charged). Why the sweep and not the request: the
        answer may take ``node_lost_confirm_s``, the agent must hear back at once, and the work
        must move on at once (the agent killed it and rejoins), so only the blame waits.
        """
        if self.ray is None:
            return
        with self._checks_lock:
            checks = list(self._checks.values())
        for check in checks:
            state = self.ray.node_state(check.node_id)
            now = self.clock()
            if state not in ("DEAD", "UNKNOWN") and now < check.deadline_ns:
                continue  # ask again at the next sweep
            with self._checks_lock:
                self._checks.pop((check.miner, check.node_id), None)
            waited_s = (now - check.deadline_ns) / NS + self.settings.node_lost_confirm_s
            if state in ("DEAD", "UNKNOWN"):
                log.info("node_lost of miner %s confirmed: Ray reports node %s %s, %.1f s after the report",
                         check.miner, check.node_id, state, waited_s)
                continue
            charged = state == "ALIVE"
            reason = NODE_LOST_BUT_ALIVE if charged else NODE_LOST_UNCONFIRMED
            evidence = json.dumps({"node_lost": json.loads(check.report), "node_id": check.node_id,
                                   "ray_state": state, "checked_ns": now,
                                   "node_lost_confirm_s": self.settings.node_lost_confirm_s})
            with self.engine.begin() as conn:
                for job_id, attempt in (check.lost if charged and check.lost else [(None, None)]):
                    self.ledger.incident(conn, check.miner, reason, charged=charged, job_id=job_id, attempt=attempt,
                                         evidence=evidence)
            log.warning("node_lost of miner %s: Ray %s node %s %.1f s after the report: %s", check.miner,
                        "still reports ALIVE" if charged else "could not be asked about", check.node_id,
                        waited_s, reason)

    def pending_node_losses(self) -> list[NodeLossCheck]:
        """The node_lost reports still waiting for Ray's view."""
        with self._checks_lock:
            return list(self._checks.values())

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
