"""The watchtower ends what nobody entitled started on the public cluster and charges the miner
it came from (``impostor``, ``rogue_workload``: banning incidents).

First against stand-ins on 127.0.0.1 driving ValidatorCore directly: a head dashboard whose State
API listings are scripted (nodes, drivers, jobs, actors, tasks; it records Jobs API stops), and
a gRPC server speaking the GCS's own services (DrainNode and KillActorViaGcs, recorded; the
autoscaler's GetClusterResourceState; UNAUTHENTICATED without the token, as the real GCS). Then on
a dedicated local stack (its own Ray head, validator-core and two miner agents; it bans miners, so
not the shared ``stack``): a miner's node resized to more executors than admitted, a node joining
with a stolen token as another miner, and a driver started from a miner's node parking a detached
actor on the other miner's executor are each ended (and the first and last charged), while an
honest job completes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlsplit

import grpc
import httpx
import pytest
import sqlalchemy as sa
from ray.core.generated import autoscaler_pb2 as autoscaler_pb
from ray.core.generated import autoscaler_pb2_grpc as autoscaler_rpc
from ray.core.generated import gcs_service_pb2 as pb
from ray.core.generated import gcs_service_pb2_grpc as rpc

from cluster.devstack.local_stack import LocalStack
from cluster.fabric import ray_node
from cluster.fabric.ports import find_free_port_base
from cluster.protocol.envelope import seal
from cluster.protocol.http import ServiceClient
from cluster.protocol.identity import Hotkey
from cluster.protocol.messages import Challenge, ChallengeRequest, JoinRequest, NodeLost, NodeStarted
from cluster.protocol.user import request_capability
from cluster.protocol.version import local_versions
from cluster.validator import store as db
from cluster.validator.ray_state import RayState
from cluster.validator.watchtower import IMPOSTOR_UNATTRIBUTED, NODE_GRACE_S, FabricControl
from tests.cluster.validator.test_validator_service import BOB, CHARLIE, CLASS, EVE, Harness
from tests.conftest import IMAGE, REPO, USER_URI
from tests.support.net import wait_for

TOKEN = "token"  # the Harness's Ray token
HEAD = "00" * 28
NODE = {BOB.ss58: "b0" * 28, CHARLIE.ss58: "c1" * 28}  # Ray node ids: 28 bytes, hex
STRANGER = "e5" * 28


# ---------------------------------------------------------------------------- stand-ins
class Dashboard:
    """The head dashboard's State API listings (filtered as Ray does: ``=`` / ``!=`` on a key),
    scripted; and the Jobs API's stop, recorded."""

    def __init__(self) -> None:
        self.lists: dict[str, list[dict[str, Any]]] = {"nodes": [], "workers": [], "jobs": [], "actors": [],
                                                       "tasks": []}
        self.broken: dict[str, tuple[int, bytes]] = {}  # listing -> answer this instead
        self.stopped: list[str] = []
        self.authorizations: set[str | None] = set()
        dash = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:  # Serve REST (validator-core applies its apps): accepted
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._send(200, b"{}")

            def do_POST(self) -> None:
                dash.authorizations.add(self.headers.get("Authorization"))
                parts = urlsplit(self.path).path.strip("/").split("/")
                if parts[:2] == ["api", "jobs"] and parts[-1] == "stop":
                    dash.stopped.append(parts[2])
                    return self._send(200, b'{"stopped": true}')
                self._send(404, b"{}")

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path.startswith("/api/serve/"):
                    return self._send(200, b'{"applications": {}}')
                dash.authorizations.add(self.headers.get("Authorization"))
                what = url.path.removeprefix("/api/v0/")
                if what in dash.broken:
                    return self._send(*dash.broken[what])
                q = parse_qsl(url.query)
                keys, preds, values = ([v for k, v in q if k == name]
                                       for name in ("filter_keys", "filter_predicates", "filter_values"))
                rows = [r for r in dash.lists.get(what, []) if all(
                    (str(r.get(k)) == v) == (p == "=") for k, p, v in zip(keys, preds, values))]
                body = {"result": True, "msg": "", "data": {"result": {
                    "total": len(rows), "num_after_truncation": len(rows), "num_filtered": len(rows),
                    "result": rows, "partial_failure_warning": "", "warnings": None}}}
                self._send(200, json.dumps(body).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # what Ray lists
    def node(self, node_id: str, claims: dict[str, float], *, ip: str = "10.0.0.2", head: bool = False,
             state: str = "ALIVE") -> None:
        self.lists["nodes"].append({"node_id": node_id, "node_ip": ip, "is_head_node": head, "state": state,
                                    "resources_total": {"CPU": 1.0, "memory": 1e9, f"node:{ip}": 1.0, **claims},
                                    "labels": {}, "start_time_ms": 1, "end_time_ms": 0})

    def driver(self, job_id: str, node_id: str, *, alive: bool = True, submission: str | None = None) -> None:
        self.lists["workers"].append({"worker_id": job_id + "ff" * 24, "worker_type": "DRIVER", "node_id": node_id,
                                      "is_alive": alive, "ip": "10.0.0.2", "pid": 4242})
        self.lists["jobs"].append({"job_id": job_id, "submission_id": submission,
                                   "type": "SUBMISSION" if submission else "DRIVER",
                                   "status": "RUNNING" if alive else "SUCCEEDED"})

    def actor(self, actor_id: str, job_id: str, node_id: str, *, name: str | None = None, cls: str = "Parked",
              namespace: str = "anon", resources: dict[str, float] | None = None) -> None:
        self.lists["actors"].append({"actor_id": actor_id, "class_name": cls, "state": "ALIVE", "job_id": job_id,
                                     "name": name, "node_id": node_id, "ray_namespace": namespace,
                                     "required_resources": resources or {}, "is_detached": True})

    def task(self, task_id: str, job_id: str, *, name: str, func: str, resources: dict[str, float]) -> None:
        self.lists["tasks"].append({"task_id": task_id, "name": name, "func_or_class_name": func, "state": "RUNNING",
                                    "type": "NORMAL_TASK", "job_id": job_id, "node_id": None,
                                    "required_resources": resources})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Gcs:
    """The GCS's gRPC services the watchtower calls: DrainNode and KillActorViaGcs, recorded;
    GetClusterResourceState, answering the dashboard's nodes' resources (or ``resized``'s);
    UNAUTHENTICATED without ``Bearer <token>`` in the metadata, as Ray's own interceptor answers."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.drained: list[str] = []
        self.killed: list[str] = []
        self.resized: dict[str, dict[str, float]] = {}  # node id -> its totals now, if not what it registered
        self.down = False
        self.drains_down = False  # the GCS answers reads but not drains
        gcs = self

        def authorized(context: grpc.ServicerContext) -> None:
            if gcs.down:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the GCS is restarting")
            if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken")

        class Nodes(rpc.NodeInfoGcsServiceServicer):
            def DrainNode(self, request, context):
                authorized(context)
                if gcs.drains_down:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the GCS is overloaded")
                gcs.drained += [d.node_id.hex() for d in request.drain_node_data]
                return pb.DrainNodeReply(drain_node_status=[pb.DrainNodeStatus(node_id=d.node_id)
                                                            for d in request.drain_node_data])

        class Actors(rpc.ActorInfoGcsServiceServicer):
            def KillActorViaGcs(self, request, context):
                authorized(context)
                gcs.killed.append(request.actor_id.hex())
                assert request.force_kill and request.no_restart
                return pb.KillActorViaGcsReply()

        class Autoscaler(autoscaler_rpc.AutoscalerStateServiceServicer):
            def GetClusterResourceState(self, request, context):
                authorized(context)
                return autoscaler_pb.GetClusterResourceStateReply(
                    cluster_resource_state=autoscaler_pb.ClusterResourceState(node_states=[
                        autoscaler_pb.NodeState(node_id=bytes.fromhex(n["node_id"]), status=autoscaler_pb.RUNNING,
                                                total_resources=gcs.resized.get(n["node_id"], n["resources_total"]))
                        for n in dashboard.lists["nodes"] if n["state"] == "ALIVE"]))

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        rpc.add_NodeInfoGcsServiceServicer_to_server(Nodes(), self.server)
        autoscaler_rpc.add_AutoscalerStateServiceServicer_to_server(Autoscaler(), self.server)
        rpc.add_ActorInfoGcsServiceServicer_to_server(Actors(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)


@pytest.fixture
def dashboard() -> Iterator[Dashboard]:
    d = Dashboard()
    yield d
    d.close()


@pytest.fixture
def gcs(dashboard: Dashboard) -> Iterator[Gcs]:
    g = Gcs(dashboard)
    yield g
    g.close()


@pytest.fixture
def h(tmp_path: Path, db_url: str, dashboard: Dashboard, gcs: Gcs) -> Iterator[Harness]:
    """Alice's validator-core, its Ray head being the stand-ins; Bob and Charlie admitted (one
    ``always_on.test`` executor each) with their Ray nodes listed as admitted, plus the head."""
    harness = Harness(tmp_path, db_url)
    harness.settings = harness.settings.model_copy(update={
        "ray_port_base": dashboard.port - 1, "ray_gcs_address": f"127.0.0.1:{gcs.port}"})
    harness.core = harness.restart()
    dashboard.node(HEAD, {}, ip="10.0.0.1", head=True)
    for m in (BOB, CHARLIE):
        dashboard.node(NODE[m.ss58], admitted(m), ip=f"10.0.0.{2 if m is BOB else 3}")
        harness.admit(m, node=False)
        harness.core.admission.node_started(harness.seal(m, "node_started", NodeStarted(node_id=NODE[m.ss58])))
    yield harness
    for core in harness.cores:
        core.watchtower.close()
        core.engine.dispose()


def admitted(m, n: int = 1) -> dict[str, float]:
    return {f"miner:{m.ss58}": 1.0, f"executor:{CLASS}": float(n)}


def incidents(h: Harness) -> list[tuple[Any, ...]]:
    i = db.incidents.c
    with h.core.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(i.miner_hotkey, i.kind, i.reason).order_by(i.id))]


def evidence(h: Harness, reason: str) -> list[dict[str, Any]]:
    with h.core.engine.connect() as conn:
        return [json.loads(e) for e in conn.execute(sa.select(db.incidents.c.evidence).where(
            db.incidents.c.reason == reason, db.incidents.c.job_id.is_(None))).scalars()]


def banned(h: Harness) -> set[str]:
    with h.core.engine.connect() as conn:
        return h.core.ledger.banned(conn, now_ns=h.clock(), ban_s=h.settings.verification_ban_s)


def node_of(h: Harness, m) -> str | None:
    with h.core.engine.connect() as conn:
        return conn.execute(sa.select(db.miners.c.node_id).where(db.miners.c.hotkey == m.ss58)).scalar_one()


def test_honest_cluster_is_left_alone(h, dashboard, gcs):
    """Serve's controller, proxies and replicas, the head's own drivers, organic attempts with
    exactly a ticket's resources, and a gateway submission running organic tasks: nothing ended."""
    dashboard.driver("01000000", HEAD)  # the dashboard's Serve head
    dashboard.actor("a1" * 16, "01000000", HEAD, name="SERVE_CONTROLLER_ACTOR", cls="ServeController",
                    namespace="serve")
    dashboard.actor("a2" * 16, "01000000", NODE[BOB.ss58], name="SERVE_REPLICA::llm#x", cls="ServeReplica:llm:LLM",
                    namespace="serve", resources={f"miner:{BOB.ss58}": 0.001, f"executor:{CLASS}": 1.0})
    dashboard.driver("02000000", HEAD)  # a test's or an operator's driver on the head
    dashboard.actor("a3" * 16, "02000000", NODE[CHARLIE.ss58])  # the head's own: the sandbox's, not ours
    with h.core.engine.begin() as conn:
        conn.execute(db.gateway_submissions.insert().values(submission_id="raysubmit_user", user_hotkey="u",
                                                            capability_id="c", created_ns=1))
    dashboard.driver("03000000", HEAD, submission="raysubmit_user")
    dashboard.task("t1" * 24, "03000000", name="rayhorde.organic", func="jobs._private.task.organic_task",
                   resources={f"miner:{BOB.ss58}": 0.001, f"executor:{CLASS}": 1.0})
    dashboard.node("d0" * 28, {}, ip="10.0.0.9")  # nobody's, claiming nothing of ours
    assert h.core.watchtower.watch() == []
    assert (gcs.drained, gcs.killed, dashboard.stopped, incidents(h)) == ([], [], [], [])
    assert dashboard.authorizations == {f"Bearer {TOKEN}"}  # validator-core's Ray token, in a header


def test_a_miners_node_claiming_more_than_admitted_is_ended_charged_and_banned(h, dashboard, gcs):
    sub = h.submit(h.capability())
    first = sub.ticket.miner_hotkey
    liar, honest = (BOB, CHARLIE) if first == BOB.ss58 else (CHARLIE, BOB)
    dashboard.lists["nodes"][1 if liar is BOB else 2]["resources_total"].update(
        {f"executor:{CLASS}": 4.0, "executor:gpu.a100": 8.0})
    offences = h.core.watchtower.watch()
    assert [o.reason for o in offences] == ["impostor"] and gcs.drained == [NODE[liar.ss58]]
    assert incidents(h) == [(liar.ss58, "miner", "impostor"), (liar.ss58, "miner", "impostor")]  # node, attempt
    (ev,) = evidence(h, "impostor")
    claimed = {f"miner:{liar.ss58}": 1.0, f"executor:{CLASS}": 4.0, "executor:gpu.a100": 8.0}
    assert ev["admitted"] == admitted(liar) and ev["ray_reports"] == {"registered": claimed, "now": claimed}
    assert banned(h) == {liar.ss58} and node_of(h, liar) is None
    view = h.core.organic.get(h.capability(), sub.job_id)  # its attempt moved on to the honest miner
    assert view.ticket.miner_hotkey == honest.ss58 and view.ticket.attempt == 2
    h.core.watchtower.watch()  # Ray still lists it (the drain takes a moment): ended again, charged once
    assert gcs.drained == [NODE[liar.ss58]] * 2 and len(incidents(h)) == 2


def test_a_miners_node_resized_after_it_registered_is_ended_charged_and_banned(h, dashboard, gcs):
    """The State API still shows what the node registered with; the GCS's scheduler counts the new
    totals (ResizeRayletResourceInstances, open to any token holder)."""
    gcs.resized[NODE[BOB.ss58]] = {**admitted(BOB), f"executor:{CLASS}": 3.0, "CPU": 1.0}
    (o,) = h.core.watchtower.watch()
    assert (o.reason, o.miner, gcs.drained) == ("impostor", BOB.ss58, [NODE[BOB.ss58]])
    assert o.evidence["ray_reports"] == {"registered": admitted(BOB), "now": admitted(BOB, 3)}
    assert banned(h) == {BOB.ss58}


def test_a_gcs_that_cannot_be_read_judges_nothing(h, dashboard, gcs):
    gcs.resized[NODE[BOB.ss58]] = {}
    dashboard.driver("05000000", NODE[BOB.ss58])
    gcs.down = True
    assert h.core.watchtower.watch() is None and incidents(h) == []


def test_a_stolen_token_node_is_ended_after_the_grace_and_nobody_charged(h, dashboard, gcs):
    dashboard.node(STRANGER, admitted(CHARLIE), ip="10.0.0.3")  # Charlie's identity, and Charlie's address
    assert h.core.watchtower.watch() == [] and gcs.drained == []  # maybe Charlie's new node: wait
    h.clock.advance(NODE_GRACE_S + 1)
    (o,) = h.core.watchtower.watch()
    assert (o.reason, o.miner, gcs.drained) == ("impostor", None, [STRANGER])
    assert incidents(h) == [(CHARLIE.ss58, "fabric", IMPOSTOR_UNATTRIBUTED)] and banned(h) == set()
    (ev,) = evidence(h, IMPOSTOR_UNATTRIBUTED)
    assert ev["node_ip"] == "10.0.0.3" and ev["admitted_miners_at_this_ip"] == [CHARLIE.ss58]
    assert node_of(h, CHARLIE) == NODE[CHARLIE.ss58]  # the impersonated miner keeps its node


def test_a_node_its_miner_reported_lost_is_left_for_rays_view_to_judge(h, dashboard, gcs):
    """Ending it would turn a node_lost lie into a confirmed loss (admission.sweep charges a node
    Ray still reports ALIVE node_lost_confirm_s after the report)."""
    h.core.admission.node_lost(h.seal(BOB, "node_lost", NodeLost(node_id=NODE[BOB.ss58])))
    assert node_of(h, BOB) is None and [c.node_id for c in h.core.admission.pending_node_losses()] == [NODE[BOB.ss58]]
    for _ in range(2):  # past the grace a node carrying an admitted miner's identity gets otherwise
        assert h.core.watchtower.watch() == [] and gcs.drained == []  # Bob's identity, not Bob's node: spared
        h.clock.advance(NODE_GRACE_S + 1)
    h.clock.advance(h.settings.node_lost_confirm_s)
    h.core.admission.sweep()  # Ray still lists it ALIVE: the report was a lie
    assert (BOB.ss58, "miner", "node_lost_but_alive") in incidents(h)


def test_a_node_claiming_executors_or_two_miners_is_ended_at_once(h, dashboard, gcs):
    dashboard.node("e1" * 28, {f"executor:{CLASS}": 8.0})
    dashboard.node("e2" * 28, {**admitted(BOB), **admitted(CHARLIE)})
    dashboard.node("e3" * 28, admitted(EVE))  # not admitted here
    h.core.watchtower.watch()
    assert sorted(gcs.drained) == ["e1" * 28, "e2" * 28, "e3" * 28]
    assert sorted(incidents(h)) == [(BOB.ss58, "fabric", IMPOSTOR_UNATTRIBUTED),
                                    (CHARLIE.ss58, "fabric", IMPOSTOR_UNATTRIBUTED)]


def test_a_driver_on_a_miners_node_is_ended_and_charged(h, dashboard, gcs):
    dashboard.driver("05000000", NODE[BOB.ss58])
    offences = h.core.watchtower.watch()
    assert [(o.reason, o.miner) for o in offences] == [("rogue_workload", BOB.ss58)]
    assert gcs.drained == [NODE[BOB.ss58]] and incidents(h) == [(BOB.ss58, "miner", "rogue_workload")]
    assert banned(h) == {BOB.ss58} and node_of(h, BOB) is None
    assert h.submit(h.capability()).ticket.miner_hotkey == CHARLIE.ss58  # placement stopped at once


def test_an_actor_parked_on_another_miners_executor_is_killed_and_its_drivers_miner_charged(h, dashboard, gcs):
    dashboard.driver("06000000", NODE[BOB.ss58], alive=False)  # the driver parked it and left
    dashboard.actor("ac" * 16, "06000000", NODE[CHARLIE.ss58],
                    resources={f"miner:{CHARLIE.ss58}": 0.001, f"executor:{CLASS}": 1.0})
    h.core.watchtower.watch()
    assert gcs.killed == ["ac" * 16] and gcs.drained == [NODE[BOB.ss58]]
    assert incidents(h) == [(BOB.ss58, "miner", "rogue_workload")]
    (ev,) = evidence(h, "rogue_workload")
    assert (ev["actor_id"], ev["node_id"], ev["driver_node_id"]) == ("ac" * 16, NODE[CHARLIE.ss58], NODE[BOB.ss58])
    assert banned(h) == {BOB.ss58}


def test_a_gateway_submission_running_other_work_and_a_submission_past_the_gateway_are_stopped(h, dashboard, gcs):
    with h.core.engine.begin() as conn:
        conn.execute(db.gateway_submissions.insert().values(submission_id="raysubmit_user", user_hotkey="u",
                                                            capability_id="c", created_ns=1))
    dashboard.driver("07000000", HEAD, submission="raysubmit_user")
    organic = {f"miner:{BOB.ss58}": 0.001, f"executor:{CLASS}": 1.0}
    dashboard.task("71" * 24, "07000000", name="rayhorde.organic", func="evil.organic_task_not", resources=organic)
    dashboard.task("72" * 24, "07000000", name="rayhorde.organic", func="organic_task",
                   resources={**organic, "CPU": 1.0})
    dashboard.task("73" * 24, "07000000", name="rayhorde.organic", func="organic_task",
                   resources={f"miner:{BOB.ss58}": 0.001, "executor:gpu.a100": 1.0})  # not a class Bob offers
    dashboard.driver("08000000", HEAD, submission="raysubmit_past_gateway")
    h.core.watchtower.watch()
    assert sorted(set(dashboard.stopped)) == ["raysubmit_past_gateway", "raysubmit_user"]
    assert (gcs.drained, incidents(h)) == ([], [])  # the head is never drained; no miner did it


@pytest.mark.parametrize("broken", ["nodes", "workers", "jobs", "actors", "tasks"])
@pytest.mark.parametrize("answer", [(500, b'{"result": false, "msg": "Failed to query the GCS", "data": {}}'),
                                    (401, b"Unauthorized"), (200, b"<html>not the dashboard</html>"),
                                    (200, b'{"result": true, "data": {"result": {"result": [{"x": 1}]}}}')],
                         ids=["gcs-down", "unauthorized", "not-json", "bad-rows"])
def test_state_api_down_nobody_charged(h, dashboard, gcs, broken, answer):
    dashboard.driver("05000000", NODE[BOB.ss58])  # a rogue driver, and an impostor: both unseen this round
    dashboard.node(STRANGER, {f"executor:{CLASS}": 8.0})
    dashboard.broken[broken] = answer
    assert h.core.watchtower.watch() is None
    assert (gcs.drained, gcs.killed, dashboard.stopped, incidents(h)) == ([], [], [], [])


def test_state_api_silent_nobody_charged(h, dashboard, gcs):
    dashboard.driver("05000000", NODE[BOB.ss58])
    dashboard.close()
    assert h.core.watchtower.watch() is None and incidents(h) == []


def test_a_drain_the_gcs_refuses_is_retried_and_the_miner_charged_once(h, dashboard, gcs):
    dashboard.driver("05000000", NODE[BOB.ss58])
    gcs.drains_down = True
    h.core.watchtower.watch()
    assert gcs.drained == [] and incidents(h) == [(BOB.ss58, "miner", "rogue_workload")]  # Ray's listing is the evidence
    gcs.drains_down = False
    h.core.watchtower.watch()
    assert gcs.drained == [NODE[BOB.ss58]] and len(incidents(h)) == 1
    dashboard.lists["workers"].clear()
    h.core.watchtower.watch()
    assert gcs.drained == [NODE[BOB.ss58]] and len(incidents(h)) == 1


def test_without_the_token_the_gcs_refuses(h, gcs):
    control = FabricControl(h.settings.gcs_address(), h.settings.dashboard_url(), "a-stolen-old-token")
    try:
        assert control.end_node(NODE[BOB.ss58]) is False and control.kill_actor("ac" * 16) is False
    finally:
        control.close()
    assert (gcs.drained, gcs.killed) == ([], [])


def test_the_watchtower_runs_in_its_own_thread(h, dashboard, gcs):
    h.settings = h.settings.model_copy(update={"watch_interval_s": 0.2})
    core = h.restart()
    dashboard.driver("05000000", NODE[BOB.ss58])
    threads = core.start()
    try:
        assert "watchtower" in [t.name for t in threads]
        wait_for(lambda: gcs.drained, 10, "the rogue driver's node drained")
        wait_for(lambda: incidents(h), 10, "the charge recorded (written after the drain)")
    finally:
        core.stop()
    assert incidents(h) == [(BOB.ss58, "miner", "rogue_workload")]


# ---------------------------------------------------------------------------- on a real Ray head
ROGUE_DRIVER = """
import sys, time
import ray
ray.init(address=sys.argv[1], _temp_dir=sys.argv[2], log_to_driver=False, namespace="rogue")

@ray.remote(num_cpus=0)
class Parked:
    pass

actor = Parked.options(name="parked", lifetime="detached", resources=dict(
    [(f"miner:{sys.argv[3]}", 0.001), ("executor:always_on.test", 1.0)])).remote()
print(ray.get_runtime_context().get_node_id(), actor._actor_id.hex(), flush=True)  # the watch may kill it at once
time.sleep(600)
"""
HONEST_DRIVER = """
import sys
import ray, jobs
ray.init(address=sys.argv[1], log_to_driver=False)
view = jobs.submit({"image": sys.argv[4], "command": ["echo", "honest"]}, validator_url=sys.argv[2],
                   capability=sys.argv[3]).result(timeout_s=120)
print(view.status.value, view.miner_hotkey, repr(view.result.stdout if view.result else None), flush=True)
"""


@pytest.mark.integration
@pytest.mark.slow
def test_impostor_nodes_and_a_rogue_driver_are_ended_and_charged_while_honest_jobs_complete(engine, tmp_path):
    metagraph = json.loads((REPO / "configs" / "metagraph.local.json").read_text())  # + Eve, a miner of ours
    metagraph["neurons"].append({"uid": 3, "hotkey": EVE.ss58, "stake_rao": 10 ** 9, "validator_permit": False})
    (tmp_path / "metagraph.json").write_text(json.dumps(metagraph))
    local = LocalStack(tmp_path / "stack", miners=2, executors_per_miner=2, validator_env={
        "RAYHORDE_VALIDATOR_METAGRAPH_PATH": str(tmp_path / "metagraph.json"),
        "RAYHORDE_VALIDATOR_WATCH_INTERVAL_S": "1"})
    procs: list[Any] = []
    tmp_dirs = [f"/tmp/rh-wt-{uuid.uuid4().hex[:6]}-{n}" for n in ("eve", "stolen")]
    try:
        state = local.up()
        token = Path(state["token_path"]).read_text().strip()
        url, gcs_address = state["validator_url"], state["gcs_address"]
        miners = {n: json.loads((local.home / "wallets" / n / "hotkeys" / "default").read_text())["ss58Address"]
                  for n in ("miner1", "miner2")}
        ray = RayState(state["dashboard_url"], token)
        validator = ServiceClient(url)
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

        def status() -> dict[str, Any]:
            return httpx.get(f"{url}/v1/status", timeout=5).json()

        def incident(miner: str, reason: str) -> dict[str, Any] | None:
            return next((i for i in status()["incidents"] if i["miner_hotkey"] == miner and i["reason"] == reason),
                        None)

        def node(name: str, resources: dict[str, float], tmp: str) -> str:
            node_file = tmp_path / f"{name}.json"
            procs.append(ray_node.start_worker(
                gcs_address=gcs_address, temp_dir=tmp, token=token, resources=resources, num_cpus=0,
                object_store_mb=80, node_ports_base=find_free_port_base(), node_id_file=str(node_file),
                log_path=str(tmp_path / f"{name}.log"), cwd=str(tmp_path / name)))
            return wait_for(lambda: node_file.exists() and json.loads(node_file.read_text())["node_id"], 60,
                            f"{name}'s Ray node")

        # 1. Eve is admitted for one executor, her node starts with one, and she then resizes it to
        # three through the GCS (the autoscaler's ResizeRayletResourceInstances: any token holder can)
        ch = Challenge.model_validate(validator.post("/v1/admission/challenge",
                                                     ChallengeRequest(miner_hotkey=EVE.ss58).model_dump()))
        validator.post_signed("/v1/admission/join", seal(EVE, "admission_join", JoinRequest(
            validator=ch.validator_hotkey, challenge=ch.nonce, executor_classes={CLASS: 1}, versions=local_versions())))
        eve_node = node("eve", {f"miner:{EVE.ss58}": 1.0, f"executor:{CLASS}": 1.0}, tmp_dirs[0])
        validator.post_signed("/v1/admission/node", seal(EVE, "node_started", NodeStarted(node_id=eve_node)))
        with grpc.insecure_channel(gcs_address) as channel:
            autoscaler_rpc.AutoscalerStateServiceStub(channel).ResizeRayletResourceInstances(
                autoscaler_pb.ResizeRayletResourceInstancesRequest(node_id=bytes.fromhex(eve_node), resources={
                    f"executor:{CLASS}": 3.0}), timeout=10, metadata=[("authorization", f"Bearer {token}")])
        # 2. a driver started from miner1's node parks a detached actor on miner2's executor
        rogue = subprocess.Popen([sys.executable, "-c", ROGUE_DRIVER, gcs_address,
                                  ray_node.short_tmp(local.home, "miner1"), miners["miner2"]],
                                 env=env, stdout=subprocess.PIPE, stderr=(tmp_path / "rogue.log").open("w"),
                                 text=True, start_new_session=True)
        procs.append(rogue)
        said = rogue.stdout.readline().split()
        assert len(said) == 2, (tmp_path / "rogue.log").read_text()[-3000:]
        driver_node, actor_id = said
        miner1_node = json.loads((local.home / "miner1" / "node.json").read_text())["node_id"]
        miner2_node = json.loads((local.home / "miner2" / "node.json").read_text())["node_id"]
        assert driver_node == miner1_node
        # 3. a node joins with the stolen token as miner2
        stolen_node = node("stolen", {f"miner:{miners['miner2']}": 1.0, f"executor:{CLASS}": 2.0}, tmp_dirs[1])
        started = time.monotonic()

        eve = wait_for(lambda: incident(EVE.ss58, "impostor"), 30, "Eve charged")
        assert eve["kind"] == "miner"
        wait_for(lambda: ray.node_state(eve_node) == "DEAD", 30, "Eve's node ended")
        rogue_charge = wait_for(lambda: incident(miners["miner1"], "rogue_workload"), 30, "miner1 charged")
        assert rogue_charge["kind"] == "miner"
        wait_for(lambda: ray.node_state(miner1_node) == "DEAD", 30, "the rogue driver's node ended")

        def actor_state() -> str:
            return httpx.get(f"{state['dashboard_url']}/api/v0/actors", params={
                "filter_keys": "actor_id", "filter_predicates": "=", "filter_values": actor_id},
                headers={"Authorization": f"Bearer {token}"}, timeout=10).json()["data"]["result"]["result"][0]["state"]

        wait_for(lambda: actor_state() == "DEAD", 30, "the parked actor killed")
        wait_for(lambda: ray.node_state(stolen_node) == "DEAD", 40, "the stolen-token node ended")
        assert wait_for(lambda: incident(miners["miner2"], IMPOSTOR_UNATTRIBUTED), 10, "the impersonation recorded")[
            "kind"] == "fabric"
        took = time.monotonic() - started
        assert took < NODE_GRACE_S + 20, f"ended within a few watch intervals, not {took:.0f} s"
        assert incident(miners["miner2"], "rogue_workload") is None and incident(miners["miner2"], "impostor") is None
        assert ray.node_state(miner2_node) == "ALIVE"  # the honest miner's node untouched
        # (the driver's OS process lives on on miner1's host, which is that miner's business: with
        # its node drained it is no cluster member, and its Ray calls have no raylet to go to)

        # the honest miner keeps working: a job completes on miner2 (miner1 and Eve are banned)
        cap = request_capability(url, Hotkey.from_uri(USER_URI), max_jobs=10, ttl_s=600)
        honest = subprocess.run([sys.executable, "-c", HONEST_DRIVER, gcs_address, url, cap, IMAGE], env=env,
                                capture_output=True, text=True, timeout=180, cwd=REPO)
        assert honest.stdout.split() == ["completed", miners["miner2"], "'honest\\n'"], honest.stderr[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                ray_node.stop_process(p)
        local.down()
        for d in tmp_dirs:
            shutil.rmtree(d, ignore_errors=True)
