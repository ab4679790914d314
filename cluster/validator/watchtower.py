"""validator-core's watchtower: it reads the public cluster as Ray sees it, ends what nobody
entitled started, and charges (so bans) the miner it came from.

Each ``watch_interval_s`` (its own thread: a round waits on HTTP and gRPC, the sweeper never must)
it reads the head dashboard's State API (nodes, drivers, jobs, live actors, running tasks) and each
node's resources as the GCS's scheduler counts them now. A read that fails skips the round:
nothing is judged, and nobody charged, on missing data. Entitled, and left alone:
  nodes    the head; an admitted miner's node (``miners.node_id``) with exactly the ``miner:`` /
           ``executor:`` resources it was admitted with; a nobody's node with none of them.
  drivers  the head's own (the dashboard's agents; drivers placed there are the sandbox's to
           contain), and the Jobs gateway's submissions (``gateway_submissions``).
  actors   Serve's: the job of ``SERVE_CONTROLLER_ACTOR`` (namespace ``serve``, on the head).
  tasks    organic attempts (:meth:`Watchtower._organic`) and Serve's.
  Work of the head's own drivers is not judged; rogue work is charged to the miner whose node
  runs (or ran) its job's driver.
Everything else is an offence, charged once and ended again each round while Ray lists it:
  impostor        an admitted miner's node with other resources: drained, its miner charged. A
                  nobody's node with ours (a stolen token): drained, nobody charged (see
                  :meth:`Watchtower._judge_nodes`), a fabric ``impostor_unattributed`` record for
                  each miner it impersonates; one naming exactly one admitted miner waits
                  ``NODE_GRACE_S`` (its agent reports a node only once Ray registered it).
  rogue_workload  the driver's node drained (never the head), a rogue actor killed (a detached one
                  outlives its driver), a submission past the gateway, or a gateway submission
                  running anything but organic tasks, stopped; the driver node's miner charged.
Both reasons ban (:data:`.ledger.BANNING`); the charged miner's node leaves its admission at
once and its attempts and streams are retired as charged, as on node_lost.

Ending goes through the GCS's own gRPC API (DrainNode, KillActorViaGcs) and the Jobs API, the
token in each call's metadata, never in validator-core's environment (Ray's loader caches it per
process; a rotation would leave it stale). A GCS client is not a cluster member: no raylet, no
worker; it runs nothing and is handed nothing.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import httpx
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.protocol.canonical import NS
from cluster.protocol.identity import Clock
from cluster.protocol.messages import executor_resource, miner_resource, node_resources
from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.changes import Changes
from cluster.validator.ledger import IMPOSTOR, ROGUE_WORKLOAD, Ledger
from cluster.validator.placement import Placement
from cluster.validator.streams import StreamDesk

log = logging.getLogger("rayhorde.validator")

IMPOSTOR_UNATTRIBUTED = "impostor_unattributed"  # incidents.reason (fabric) of a nobody's node impersonating a miner
NODE_GRACE_S = 10.0  # a node naming one admitted miner that is not its node yet: its agent's node_started may follow
ORGANIC_NAME, ORGANIC_FUNC = "rayhorde.organic", "organic_task"  # jobs' organic task, as Ray lists it
SERVE_NAMESPACE, SERVE_CONTROLLER = "serve", "SERVE_CONTROLLER_ACTOR"
CLAIMS = ("miner:", "executor:")  # the resources that route our work to a miner
LIMIT = 10000  # the State API's largest page


# ---------------------------------------------------------------------------- what Ray lists
class _Row(BaseModel):
    model_config = ConfigDict(extra="ignore")


class NodeRow(_Row):
    node_id: str
    node_ip: str = ""
    is_head_node: bool
    state: str
    resources_total: dict[str, float] = {}

    def claims(self) -> dict[str, float]:
        return {k: v for k, v in self.resources_total.items() if k.startswith(CLAIMS)}


class DriverRow(_Row):
    worker_id: str  # a driver's worker id is its job id followed by ff bytes
    node_id: str | None = None
    is_alive: bool
    pid: int | None = None

    @property
    def job_id(self) -> str:
        return self.worker_id[:8]


class JobRow(_Row):
    job_id: str | None = None  # None: a submission whose entrypoint has not connected (or never does)
    submission_id: str | None = None
    type: str  # SUBMISSION or DRIVER
    status: str | None = None


class ActorRow(_Row):
    actor_id: str
    class_name: str = ""
    job_id: str
    name: str | None = None
    node_id: str | None = None
    ray_namespace: str | None = None
    required_resources: dict[str, float] | None = None
    is_detached: bool | None = None


class TaskRow(_Row):
    task_id: str
    name: str = ""
    func_or_class_name: str | None = None
    job_id: str
    node_id: str | None = None
    required_resources: dict[str, float] | None = None


R = TypeVar("R", bound=_Row)


@dataclass
class Census:
    """One round's reading of the cluster."""
    nodes: list[NodeRow]
    drivers: list[DriverRow]
    jobs: list[JobRow]
    actors: list[ActorRow]
    tasks: list[TaskRow]
    live: dict[str, dict[str, float]] = field(default_factory=dict)  # node id -> its scheduler's totals now


class StateReader:
    """The State API listings; each ``None`` when Ray could not be asked (never an exception)."""

    LISTINGS: tuple[tuple[str, type[_Row], list[tuple[str, str, str]]], ...] = (
        ("nodes", NodeRow, []), ("workers", DriverRow, [("worker_type", "=", "DRIVER")]), ("jobs", JobRow, []),
        ("actors", ActorRow, [("state", "!=", "DEAD")]),
        ("tasks", TaskRow, [("type", "=", "NORMAL_TASK"), ("state", "!=", "FINISHED"), ("state", "!=", "FAILED")]))

    def __init__(self, dashboard_url: str, token: str, *, timeout_s: float = 5) -> None:
        self.base = dashboard_url.rstrip("/") + "/api/v0/"
        self._http = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {token}"})

    def census(self) -> Census | None:
        found: list[list[Any]] = []
        for what, row, filters in self.LISTINGS:
            rows = self._list(what, row, filters)
            if rows is None:
                return None
            found.append(rows)
        return Census(*found)

    def _list(self, what: str, row: type[R], filters: list[tuple[str, str, str]]) -> list[R] | None:
        params: list[tuple[str, str]] = [("limit", str(LIMIT)), ("timeout", "5"), ("detail", "true")]
        for key, predicate, value in filters:
            params += [("filter_keys", key), ("filter_predicates", predicate), ("filter_values", value)]
        url = self.base + what
        try:
            resp = self._http.get(url, params=params)
        except httpx.HTTPError as exc:
            log.warning("watchtower: Ray State API %s did not answer: %r", url, exc)
            return None
        if resp.status_code != 200:
            log.warning("watchtower: Ray State API %s answered %d: %s", url, resp.status_code, resp.text[:300])
            return None
        try:
            body = json.loads(resp.content)
            if body.get("result") is not True:
                raise ValueError(f"failure: {str(body.get('msg'))[:200]}")
            listing = body["data"]["result"]
            rows = [row.model_validate(r) for r in listing["result"]]
            cut = int(listing.get("num_filtered", len(rows))) > len(rows)
        except (ValueError, TypeError, KeyError, AttributeError, ValidationError) as exc:
            log.warning("watchtower: Ray State API %s answered something else than a listing: %s", url,
                        str(exc).splitlines()[0] if str(exc) else repr(exc))
            return None
        if cut:  # only presence is ever evidence; a cut list hides nothing we act on
            log.warning("watchtower: Ray State API %s listed %d of more %s", url, len(rows), what)
        return rows

    def close(self) -> None:
        self._http.close()


# ---------------------------------------------------------------------------- ending things
class FabricControl:
    """Ends a node, an actor or a submission: the GCS's gRPC API and the Jobs API, with the token.
    Every method answers whether Ray accepted; none raises."""

    def __init__(self, gcs_address: str, dashboard_url: str, token: str, *, timeout_s: float = 5) -> None:
        self.gcs_address = gcs_address
        self.jobs_url = dashboard_url.rstrip("/") + "/api/jobs/"
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._http = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {token}"})
        self._channel: Any = None
        self._lock = threading.Lock()

    def end_node(self, node_id: str) -> bool:
        """DrainNode, what autoscaler v1's ``drain_nodes`` sends. Measured (Ray 2.60, token auth):
        the node is DEAD at once ("Terminated by autoscaler") and its raylet told to exit; one that
        ignores it is no member any more. Without the token: UNAUTHENTICATED."""
        pb, rpc, _ = self._protos()
        return self._ok(f"drain node {node_id}", lambda: rpc.NodeInfoGcsServiceStub(self._channel).DrainNode(
            pb.DrainNodeRequest(drain_node_data=[pb.DrainNodeData(node_id=bytes.fromhex(node_id))]),
            timeout=self.timeout_s, metadata=self._metadata))

    def kill_actor(self, actor_id: str) -> bool:
        """KillActorViaGcs, force and no restart: ``ray.kill``'s own RPC (measured: DEAD at once)."""
        pb, rpc, _ = self._protos()
        return self._ok(f"kill actor {actor_id}", lambda: rpc.ActorInfoGcsServiceStub(self._channel).KillActorViaGcs(
            pb.KillActorViaGcsRequest(actor_id=bytes.fromhex(actor_id), force_kill=True, no_restart=True),
            timeout=self.timeout_s, metadata=self._metadata))

    def live_resources(self) -> dict[str, dict[str, float]] | None:
        """Each live node's total resources as the GCS's scheduler counts them now (the autoscaler's
        GetClusterResourceState); None if the GCS could not be asked. The State API shows what a
        node registered with, but any token holder can resize a raylet afterwards
        (ResizeRayletResourceInstances; measured: the scheduler counts the new totals, the State
        API still the old ones)."""
        _, _, (apb, arpc) = self._protos()
        try:
            state = arpc.AutoscalerStateServiceStub(self._channel).GetClusterResourceState(
                apb.GetClusterResourceStateRequest(), timeout=self.timeout_s, metadata=self._metadata)
        except Exception as exc:  # grpc.RpcError: down, UNAUTHENTICATED...
            log.warning("watchtower: the GCS at %s did not answer: %r", self.gcs_address, exc)
            return None
        return {n.node_id.hex(): dict(n.total_resources) for n in state.cluster_resource_state.node_states
                if n.status != apb.NodeStatus.DEAD}

    def _protos(self) -> tuple[Any, Any, tuple[Any, Any]]:
        # imported here for their cost (grpc, Ray's generated protos), paid once the watchtower runs
        import grpc
        from ray.core.generated import autoscaler_pb2, autoscaler_pb2_grpc, gcs_service_pb2, gcs_service_pb2_grpc

        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(self.gcs_address)
        return gcs_service_pb2, gcs_service_pb2_grpc, (autoscaler_pb2, autoscaler_pb2_grpc)

    def _ok(self, what: str, call: Callable[[], Any]) -> bool:
        try:
            status = call().status
        except Exception as exc:  # grpc.RpcError (down, UNAUTHENTICATED), a malformed id: Ray was not told
            log.warning("watchtower: the GCS at %s did not %s: %r", self.gcs_address, what, exc)
            return False
        if status.code != 0:
            log.warning("watchtower: the GCS refused to %s: %s", what, status.message)
        return status.code == 0

    def stop_submission(self, submission_id: str) -> bool:
        try:
            resp = self._http.post(f"{self.jobs_url}{submission_id}/stop")
        except httpx.HTTPError as exc:
            log.warning("watchtower: the Jobs API did not stop %s: %r", submission_id, exc)
            return False
        if resp.status_code != 200:
            log.warning("watchtower: the Jobs API answered %d to stopping %s: %s", resp.status_code, submission_id,
                        resp.text[:300])
        return resp.status_code == 200

    def close(self) -> None:
        self._http.close()
        if self._channel is not None:
            self._channel.close()


# ---------------------------------------------------------------------------- the watch
@dataclass
class Offence:
    key: str  # what it is about, stable across rounds: charged once
    reason: str  # IMPOSTOR or ROGUE_WORKLOAD
    what: str
    miner: str | None  # charged; None: nobody to charge
    evidence: dict[str, Any]
    end_node: str | None = None
    kill_actor: str | None = None
    stop_submission: str | None = None
    impersonated: list[str] = field(default_factory=list)  # admitted miners a nobody's node claimed to be


class Watchtower:
    def __init__(self, settings: ValidatorSettings, *, reader: StateReader, control: FabricControl,
                 engine: sa.Engine, alloc: threading.Lock, changes: Changes, ledger: Ledger, placement: Placement,
                 streams: StreamDesk, clock: Clock, under_review: Callable[[], set[str]] = set) -> None:
        self.settings = settings
        # node ids a node_lost report is about, still waiting for Ray's view (admission.sweep):
        # left alone, or ending them would turn a lie into a confirmed loss
        self.under_review = under_review
        self.reader = reader
        self.control = control
        self.engine = engine
        self.alloc = alloc  # held by every write that can free or take an executor
        self.changes = changes
        self.ledger = ledger
        self.placement = placement
        self.streams = streams
        self.clock = clock
        self._charged: set[str] = set()  # offence keys already recorded
        self._unowned_since: dict[str, int] = {}  # node id -> when first seen naming a miner, not its node

    def start(self, stop: threading.Event) -> threading.Thread:
        def loop() -> None:
            while not stop.wait(self.settings.watch_interval_s):
                try:
                    self.watch()
                except Exception:  # keep watching; a transient DB error must not end the watch
                    log.exception("watchtower round failed")
        thread = threading.Thread(target=loop, name="watchtower", daemon=True)
        thread.start()
        return thread

    def watch(self) -> list[Offence] | None:
        """One round: read, judge, end, charge. Returns the offences seen (None: Ray could not be
        asked, nothing judged)."""
        census = self.reader.census()
        live = None if census is None else self.control.live_resources()
        if census is None or live is None:
            log.warning("watchtower: round skipped, Ray's State API or the GCS could not be read (nobody judged)")
            return None
        census.live = live
        with self.engine.connect() as conn:
            miners = {m.hotkey: m for m in conn.execute(sa.select(db.miners))}
            gateway = set(conn.execute(sa.select(db.gateway_submissions.c.submission_id)).scalars())
        offences = self._judge_nodes(census, miners) + self._judge_work(census, miners, gateway)
        new = [o for o in offences if o.key not in self._charged]
        for o in offences:
            self._end(o, new=o.key not in self._charged)
        self._record(new)
        self._charged = {o.key for o in offences}  # forgotten once Ray no longer lists it
        return offences

    # ------------------------------------------------------------------ judging
    def _judge_nodes(self, census: Census, miners: dict[str, sa.Row]) -> list[Offence]:
        now = self.clock()
        owners = {m.node_id: m for m in miners.values() if m.node_id}
        review = self.under_review()
        alive = [n for n in census.nodes if n.state == "ALIVE" and not n.is_head_node and n.node_id not in review]
        out: list[Offence] = []
        waiting: dict[str, int] = {}
        for n in alive:
            # what it registered with (State API) and what the scheduler counts now (GCS): see live_resources
            live = {k: v for k, v in census.live.get(n.node_id, {}).items() if k.startswith(CLAIMS)}
            claims = {**n.claims(), **live}
            seen = {"node_id": n.node_id, "node_ip": n.node_ip, "ray_reports": {
                "registered": n.claims(), "now": live if n.node_id in census.live else None}}
            owner = owners.get(n.node_id)
            if owner is not None:
                admitted = node_resources(owner.hotkey, owner.executor_classes)
                if n.claims() != admitted or (n.node_id in census.live and live != admitted):
                    out.append(Offence(f"node:{n.node_id}", IMPOSTOR, f"node {n.node_id} of miner {owner.hotkey}",
                                       owner.hotkey, {**seen, "admitted": admitted}, end_node=n.node_id))
                continue
            if not claims:
                continue  # nobody's, claiming nothing of ours: no work of ours can land there
            named = [k.removeprefix("miner:") for k in claims if k.startswith("miner:")]
            impersonated = sorted(hk for hk in named if hk in miners)
            if len(named) == 1 and impersonated and f"node:{n.node_id}" not in self._charged:
                waiting[n.node_id] = first = self._unowned_since.get(n.node_id, now)
                if now - first < NODE_GRACE_S * NS:
                    continue  # maybe its miner's new node: node_started follows its registration
            # Nobody is charged: Ray's node_ip is what the node itself declared when it registered
            # (--node-ip-address), not where its connection came from, so a rival could declare an
            # admitted miner's address and have that miner banned. The IP is kept as evidence only.
            same_ip = sorted(owners[x.node_id].hotkey for x in alive if x.node_id in owners and x.node_ip == n.node_ip)
            out.append(Offence(f"node:{n.node_id}", IMPOSTOR, f"node {n.node_id}, nobody's", None,
                               {**seen, "admitted": None, "admitted_miners_at_this_ip": same_ip},
                               end_node=n.node_id, impersonated=impersonated))
        self._unowned_since = waiting
        return out

    def _judge_work(self, census: Census, miners: dict[str, sa.Row], gateway: set[str]) -> list[Offence]:
        heads = {n.node_id for n in census.nodes if n.is_head_node}
        alive = {n.node_id for n in census.nodes if n.state == "ALIVE"}
        owners = {m.node_id: m.hotkey for m in miners.values() if m.node_id}
        driver_node = {d.job_id: d.node_id for d in census.drivers}
        submission = {j.job_id: j.submission_id for j in census.jobs if j.job_id and j.submission_id}
        serve = {a.job_id for a in census.actors
                 if (a.name, a.ray_namespace) == (SERVE_CONTROLLER, SERVE_NAMESPACE) and a.node_id in heads}
        out: list[Offence] = []

        def rogue(key: str, what: str, job_id: str | None, evidence: dict[str, Any], *, actor: str | None = None,
                  sid: str | None = None) -> None:
            node = driver_node.get(job_id or "")
            sid = sid or submission.get(job_id or "")
            out.append(Offence(key, ROGUE_WORKLOAD, what, owners.get(node or ""),
                               {**evidence, "job_id": job_id, "driver_node_id": node, "submission_id": sid},
                               end_node=node if node in alive and node not in heads else None,
                               kill_actor=actor, stop_submission=sid))

        def judged(job_id: str) -> bool:  # not Serve's, not the head's own, and its driver known
            node = driver_node.get(job_id)
            return job_id not in serve and node is not None and (
                node not in heads or submission.get(job_id) in gateway)

        for d in census.drivers:  # (a driver on a dead node is no member any more)
            if d.is_alive and d.node_id in alive and d.node_id not in heads and submission.get(d.job_id) not in gateway:
                rogue(f"driver:{d.job_id}", f"driver of job {d.job_id} on node {d.node_id}", d.job_id,
                      {"driver_pid": d.pid})
        for j in census.jobs:  # submitted to the Jobs API past the gateway (from the head's host)
            if (j.type == "SUBMISSION" and j.submission_id and j.submission_id not in gateway
                    and j.status in ("PENDING", "RUNNING") and f"driver:{j.job_id}" not in {o.key for o in out}):
                rogue(f"submission:{j.submission_id}", f"submission {j.submission_id}, not the gateway's", j.job_id,
                      {}, sid=j.submission_id)
        for a in census.actors:
            if judged(a.job_id):
                rogue(f"actor:{a.actor_id}", f"actor {a.actor_id} ({a.class_name}) of job {a.job_id}", a.job_id,
                      a.model_dump(), actor=a.actor_id)
        for t in census.tasks:
            if judged(t.job_id) and not self._organic(t, miners):
                rogue(f"task:{t.task_id}", f"task {t.task_id} ({t.name}) of job {t.job_id}", t.job_id, t.model_dump())
        return out

    @staticmethod
    def _organic(t: TaskRow, miners: dict[str, sa.Row]) -> bool:
        """Whether ``t`` is an organic attempt: its name, its function, exactly a ticket's resources."""
        if t.name != ORGANIC_NAME or (t.func_or_class_name or "").rsplit(".", 1)[-1] != ORGANIC_FUNC:
            return False
        res = t.required_resources or {}
        mine = [k.removeprefix("miner:") for k in res if k.startswith("miner:")]
        classes = [k.removeprefix("executor:") for k in res if k.startswith("executor:")]
        if len(res) != 2 or len(mine) != 1 or len(classes) != 1 or mine[0] not in miners:
            return False
        return (res == {miner_resource(mine[0]): 0.001, executor_resource(classes[0]): 1.0}
                and classes[0] in miners[mine[0]].executor_classes)

    # ------------------------------------------------------------------ acting
    def _end(self, o: Offence, *, new: bool) -> None:
        done = [f"{what} {target} {how}" for what, target, end, how in (
            ("actor", o.kill_actor, self.control.kill_actor, "killed"),
            ("submission", o.stop_submission, self.control.stop_submission, "stopped"),
            ("node", o.end_node, self.control.end_node, "drained")) if target and end(target)]
        if not new and not done:
            return  # said already, and nothing left to end
        log.warning("watchtower: %s: %s; %s; %s", o.reason, o.what, ", ".join(done) or "nothing could be ended",
                    f"charged to miner {o.miner}" if o.miner else "nobody charged")

    def _record(self, offences: list[Offence]) -> None:
        """One transaction per miner: its incidents (charged, or a fabric record of impersonation)."""
        ended = 0
        for miner in sorted({o.miner for o in offences if o.miner} | {v for o in offences for v in o.impersonated}):
            mine = [o for o in offences if o.miner == miner]
            with self.alloc, self.engine.begin() as conn:
                for o in offences:
                    if o.miner == miner or miner in o.impersonated:
                        self.ledger.incident(conn, miner, o.reason if o.miner else IMPOSTOR_UNATTRIBUTED,
                                             charged=o.miner == miner, job_id=None, attempt=None,
                                             evidence=json.dumps({"what": o.what, **o.evidence}))
                if mine:
                    ended += self._dismiss(conn, miner, mine[0].reason,
                                           json.dumps([{"what": o.what, **o.evidence} for o in mine]))
        if ended:
            self.streams.reconcile()  # the charged miner's apps leave Serve's config
        if offences:
            self.changes.notify()

    def _dismiss(self, conn: sa.Connection, miner: str, reason: str, evidence: str) -> int:
        """Take the miner's node from its admission, as node_lost does, and retire its attempts and
        streams as charged: placement stops at once. Caller holds the allocation lock."""
        conn.execute(db.miners.update().where(db.miners.c.hotkey == miner).values(node_id=None))
        tickets = conn.execute(sa.select(db.tickets).where(db.tickets.c.miner_hotkey == miner,
                                                           db.tickets.c.active.is_(True))).all()
        for t in tickets:
            self.ledger.retire(conn, t, reason=reason, charged=True, evidence=evidence)
        ended = self.streams.miner_lost(conn, miner, reason=reason, charged=True, evidence=evidence)
        self.placement.dispatch(conn)
        return ended

    def close(self) -> None:
        self.reader.close()
        self.control.close()


def build_watchtower(settings: ValidatorSettings, token: str, **desks: Any) -> Watchtower:
    """The watchtower of the public cluster at ``settings``' head."""
    return Watchtower(settings, reader=StateReader(settings.dashboard_url(), token),
                      control=FabricControl(settings.gcs_address(), settings.dashboard_url(), token), **desks)

