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
    expel         a ban (``banned_hotkeys``, or a banning incident: failed verification,
                  impostor node, rogue workload) or a deregistration acts at once, not at the next
                  join: the sweeper (:meth:`AdmissionDesk.enforce`, every ``sweep_interval_s``)
                  retires its attempts, ends its streams, forgets its admission, closes the
                  firewall to it and ends its Ray node; its heartbeats, reports and joins are
                  refused with ``banned`` / ``not_registered``.
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
from typing import Callable

import sqlalchemy as sa

from cluster.chain import ChainBackend, Metagraph
from cluster.errors import AdmissionRefused
from cluster.protocol.canonical import NS
from cluster.protocol.envelope import SignedEnvelope
from cluster.protocol.identity import Clock, Hotkey, is_ss58
from cluster.protocol.messages import (
    Challenge, ChallengeRequest, Heartbeat, JoinAccepted, JoinRequest, NodeLost, NodeStarted, Preflight,
    PreflightAnswer, node_resources,
)
from cluster.protocol.version import local_versions
from cluster.settings import ExecutorClass, ValidatorSettings
from cluster.validator import store as db
from cluster.validator.changes import Changes
from cluster.validator.envelopes import EnvelopeOpener
from cluster.validator.firewall import Firewall, NoFirewall
from cluster.validator.ledger import BANNING, Ledger
from cluster.validator.placement import ACTIVE_STREAM, Placement, admitted
from cluster.validator.ray_state import RayState
from cluster.validator.streams import StreamDesk

log = logging.getLogger("rayhorde.validator")
MATCHED_VERSIONS = ("rayhorde", "ray", "python")  # a miner must run exactly these versions of the validator's
CHALLENGES_PER_HOTKEY = 8  # open (unused, unexpired) challenges one hotkey may hold
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
                 ray: RayState | None = None, firewall: Firewall | None = None) -> None:
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
        self.firewall = firewall or NoFirewall()
        self.end_node: Callable[[str], None] | None = None  # ends a Ray node (the watchtower's); None: unit tests
        self._checks: dict[tuple[str, str], NodeLossCheck] = {}  # (miner, node id) -> its pending check
        self._checks_lock = threading.Lock()

    def challenge(self, req: ChallengeRequest) -> Challenge:
        if not is_ss58(req.miner_hotkey):
            raise AdmissionRefused("malformed", f"{req.miner_hotkey!r} is not an SS58 address", status_code=400)
        now, ttl_ns = self.clock(), int(self.settings.challenge_ttl_s * NS)
        ch = Challenge(nonce=uuid.uuid4().hex, validator_hotkey=self.hotkey.ss58, expires_ns=now + ttl_ns)
        with self.engine.begin() as conn:
            # unsigned, so bounded: challenges expired a ttl ago go with every new one (till then a late
            # join hears "expired", not "unknown"), and a hotkey holds a few open ones at most
            conn.execute(db.challenges.delete().where(db.challenges.c.expires_ns < now - ttl_ns))
            held = conn.execute(sa.select(sa.func.count()).select_from(db.challenges).where(
                db.challenges.c.miner_hotkey == req.miner_hotkey, db.challenges.c.used.is_(False),
                db.challenges.c.expires_ns >= now)).scalar_one()
            if held >= CHALLENGES_PER_HOTKEY:
                raise AdmissionRefused("too_many_challenges", f"{held} unused challenges for {req.miner_hotkey} are "
                                       f"still open; use one, or ask again within {self.settings.challenge_ttl_s:g} s",
                                       status_code=429, retry_after_s=self.settings.challenge_ttl_s)
            conn.execute(db.challenges.insert().values(nonce=ch.nonce, miner_hotkey=req.miner_hotkey,
                                                       expires_ns=ch.expires_ns, used=False))
        return ch

    def sync_firewall(self) -> None:
        """Let exactly the admitted miners' addresses reach the head's Ray ports (see :mod:`.firewall`)."""
        with self.engine.connect() as conn:
            addresses = set(conn.execute(sa.select(db.miners.c.peer_address).where(
                db.miners.c.peer_address.is_not(None))).scalars())
        self.firewall.sync(addresses)

    def join(self, env: SignedEnvelope, peer_address: str | None = None) -> JoinAccepted:
        req = JoinRequest.model_validate(self.opener.open(env, "admission_join"))
        miner = env.signer
        if req.validator != self.hotkey.ss58:
            raise AdmissionRefused("wrong_validator", f"join is addressed to {req.validator}, this validator is "
                                   f"{self.hotkey.ss58}", status_code=403)
        now = self.clock()
        self._take_challenge(req.challenge, miner, now)
        self._check_eligible(miner)  # strict: no admission without reading the metagraph
        with self.engine.connect() as conn:
            why = self.refusal(conn, miner)
        if why is not None:
            raise why
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
                                                   last_heartbeat_ns=now, jobs_done=0, peer_address=peer_address))
        self.sync_firewall()  # before it answers: the miner's node connects to the head next
        if ended:
            self.streams.reconcile()
            self.changes.notify()
        return JoinAccepted(gcs_address=self.settings.gcs_address(), ray_token=self.ray_token,
                            resources=node_resources(miner, req.executor_classes),
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

    def _metagraph(self) -> Metagraph | None:
        try:
            return self.chain.metagraph(self.settings.netuid)
        except Exception as exc:  # a chain backend that is down or a file half written: ask again next time
            log.warning("metagraph unreadable (%s); membership is not re-checked against it this time", exc)
            return None

    def _check_eligible(self, miner: str, mg: Metagraph | None = None, *, need_metagraph: bool = True) -> None:
        if mg is None and need_metagraph:
            mg = self.chain.metagraph(self.settings.netuid)
        if mg is not None and mg.neuron(miner) is None:
            raise AdmissionRefused("not_registered", f"hotkey {miner} is not registered on subnet {mg.netuid} "
                                   f"(metagraph at block {mg.block}); register it, then join again", status_code=403)
        if miner in self.settings.banned_hotkeys:
            raise AdmissionRefused("banned", f"hotkey {miner} is banned by this validator", status_code=403)

    def refusal(self, conn: sa.Connection, miner: str, mg: Metagraph | None = None) -> AdmissionRefused | None:
        """Why ``miner`` may not serve this validator now, or None: deregistered, banned by the
        operator (``banned_hotkeys``), or banned by a banning incident (a failed verification, an
        impostor node, a rogue workload) within ``verification_ban_s``. A metagraph that cannot
        be read expels nobody (never on missing data): the ban checks still apply."""
        try:
            self._check_eligible(miner, mg or self._metagraph(), need_metagraph=False)
        except AdmissionRefused as exc:
            return exc
        now = self.clock()
        if miner in self.ledger.banned(conn, now_ns=now, ban_s=self.settings.verification_ban_s):
            why = conn.execute(sa.select(db.incidents.c.reason).where(
                db.incidents.c.miner_hotkey == miner, db.incidents.c.reason.in_(BANNING))
                .order_by(db.incidents.c.id.desc()).limit(1)).scalar_one()
            return AdmissionRefused("banned", f"hotkey {miner} is banned by this validator for {why} (lasts "
                                    f"{self.settings.verification_ban_s:g} s from the incident)", status_code=403)
        return None

    def expel(self, conn: sa.Connection, miner: sa.Row, why: AdmissionRefused) -> None:
        """End a miner's membership at once: its attempts are retired and its streams ended (charged
        when it is banned, a fabric incident when it merely left the metagraph), and it is no longer
        admitted, so placement passes it by and its reports and heartbeats are refused. Its Ray node
        is ended by :attr:`end_node` (the caller, after the transaction). Caller holds the
        allocation lock."""
        charged = why.reason == "banned"
        for t in self._active_tickets(conn, miner.hotkey):
            self.ledger.retire(conn, t, reason=f"miner_{why.reason}", charged=charged, evidence=why.message)
        self.streams.miner_lost(conn, miner.hotkey, reason=f"miner_{why.reason}", charged=charged,
                                evidence=why.message)
        conn.execute(db.miners.delete().where(db.miners.c.hotkey == miner.hotkey))
        self.placement.dispatch(conn)
        log.warning("miner %s expelled (%s): %s", miner.hotkey, why.reason, why.message)

    def _expel_now(self, rows: list[tuple[sa.Row, AdmissionRefused]]) -> None:
        """After expelling: close the firewall to them, end their Ray nodes, re-apply Serve's
        config, wake watchers."""
        if rows:
            self.sync_firewall()
        for miner, _ in rows:
            if miner.node_id and self.end_node is not None:
                self.end_node(miner.node_id)
        if rows:
            self.streams.reconcile()
            self.changes.notify()

    def enforce(self) -> list[str]:
        """Expel every admitted miner that may no longer serve (one metagraph read for all of
        them); run by the sweeper, so a ban or a deregistration acts within a sweep interval.
        Returns the hotkeys expelled."""
        mg = self._metagraph()
        expelled: list[tuple[sa.Row, AdmissionRefused]] = []
        with self.alloc, self.engine.begin() as conn:
            for miner in conn.execute(sa.select(db.miners)).all():
                why = self.refusal(conn, miner.hotkey, mg)
                if why is not None:
                    self.expel(conn, miner, why)
                    expelled.append((miner, why))
        self._expel_now(expelled)
        return [m.hotkey for m, _ in expelled]

    def node_started(self, env: SignedEnvelope) -> None:
        msg = NodeStarted.model_validate(self.opener.open(env, "node_started"))
        with self.engine.connect() as conn:
            miner = admitted(conn, env.signer)
        self._check_node(env.signer, msg.node_id, miner.executor_classes)
        with self.alloc, self.engine.begin() as conn:
            admitted(conn, env.signer)
            conn.execute(db.miners.update().where(db.miners.c.hotkey == env.signer)
                         .values(node_id=msg.node_id, last_heartbeat_ns=self.clock()))
            issued = self.placement.dispatch(conn)  # new capacity
        if issued:
            self.changes.notify()

    def _check_node(self, miner: str, node_id: str, classes: dict[str, int]) -> None:
        """A node a miner announces must be one Ray has: ALIVE, advertising this miner's
        ``miner:<hotkey>`` and exactly the executors it was admitted with. Otherwise a made-up id
        could later be "lost" as a fabric incident (Ray knows no such node), or a node could carry
        another miner's resources. Ray that cannot be asked refuses nothing (no accusation on
        missing data; the watchtower looks again)."""
        if self.ray is None:
            return
        node = self.ray.node(node_id)
        if node is None:
            log.warning("node_started of %s: Ray could not be asked about node %s; taken as said", miner, node_id)
            return
        if node.state != "ALIVE":
            raise AdmissionRefused("node_unknown", f"Ray has no ALIVE node {node_id} (it says {node.state}); start "
                                   "the node, then report it", status_code=409)
        want = node_resources(miner, classes)
        have = {k: v for k, v in node.resources.items() if k.startswith(("miner:", "executor:"))}
        if have != want:
            raise AdmissionRefused("node_mismatch", f"node {node_id} advertises {have}; this miner was admitted with "
                                   f"{want}: start the node with the resources the join answered", status_code=409)

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
            if conn.execute(sa.select(db.miners.c.hotkey).where(db.miners.c.hotkey == env.signer)).first() is None:
                # expelled by the sweeper (it checks bans and the metagraph each second, so the
                # heartbeat path stays one row read): say why, not just "not admitted"
                why = self.refusal(conn, env.signer)
                if why is not None:
                    raise why
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
