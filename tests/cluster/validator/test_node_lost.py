"""A ``node_lost`` report is checked against Ray's own view of the node before it counts as a fabric
incident: a node Ray still reports ALIVE after ``node_lost_confirm_s`` was not lost, and the miner
that said so is charged (``node_lost_but_alive``).

Ray's view is read over the head dashboard's State API (:class:`RayState`): here first against a
stand-in dashboard on 127.0.0.1 (its answers scripted: ALIVE, DEAD, garbage, silence) driving
ValidatorCore directly, then against the local stack's real Ray head (the lying miner; the honest
one, whose node is killed, is ``tests/jobs/test_fault_tolerance.py``).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa

from cluster.errors import AdmissionRefused
from cluster.protocol.envelope import SignedEnvelope, seal
from cluster.protocol.http import ServiceClient
from cluster.protocol.identity import Hotkey
from cluster.protocol.jobs import JobStatus
from cluster.protocol.messages import Heartbeat, NodeLost, NodeStarted
from cluster.validator import store as db
from cluster.validator.ray_state import RayState
from tests.cluster.validator.test_validator_service import BOB, CHARLIE, Harness, by_hotkey, refused
from tests.conftest import IMAGE
from tests.support.net import wait_for

NODE = {BOB.ss58: "b0" * 28, CHARLIE.ss58: "c1" * 28}  # Ray node ids: 28 bytes, hex
CONFIRM_S = 30  # ValidatorSettings.node_lost_confirm_s, the default


# ---------------------------------------------------------------------------- a stand-in head dashboard
class Dashboard:
    """The head dashboard's State API (``GET /api/v0/nodes``, filtered by node id as the GCS does)
    and Serve's REST API (nothing deployed), with scripted answers."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}  # node id -> ALIVE | DEAD
        self.resources: dict[str, dict[str, float]] = {}  # node id -> what it advertises (default: 1 CPU)
        self.raw: tuple[int, bytes] | None = None  # answer this instead
        self.delay_s = 0.0
        self.requests: list[dict[str, Any]] = []
        dash = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._send(200, b"{}")

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path.startswith("/api/serve/"):
                    return self._send(200, b'{"applications": {}}')
                query = parse_qs(url.query)
                dash.requests.append({"path": url.path, "query": query,
                                      "authorization": self.headers.get("Authorization")})
                time.sleep(dash.delay_s)
                if dash.raw is not None:
                    return self._send(*dash.raw)
                wanted = dict(zip(query.get("filter_keys", []), query.get("filter_values", [])))
                rows = [{"node_id": n, "state": s, "node_ip": "127.0.0.1", "is_head_node": False,
                         "resources_total": dash.resources.get(n, {"CPU": 1.0}), "labels": {}, "state_message": None}
                        for n, s in dash.nodes.items() if wanted.get("node_id", n) == n]
                listing = {"total": len(rows), "num_after_truncation": len(rows), "num_filtered": len(rows),
                           "result": rows, "partial_failure_warning": "", "warnings": None}
                self._send(200, json.dumps({"result": True, "msg": "", "data": {"result": listing}}).encode())

            def _send(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the silent-dashboard test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dashboard() -> Iterator[Dashboard]:
    d = Dashboard()
    yield d
    d.close()


def listing(rows: list[Any], *, num_filtered: int | None = None) -> bytes:
    n = len(rows) if num_filtered is None else num_filtered
    return json.dumps({"result": True, "msg": "", "data": {"result": {
        "total": n, "num_after_truncation": n, "num_filtered": n, "result": rows}}}).encode()


# ---------------------------------------------------------------------------- RayState
def test_ray_state_reads_a_node_as_the_gcs_sees_it(dashboard):
    alive, dead, never = "a" * 56, "d" * 56, "e" * 56
    dashboard.nodes = {alive: "ALIVE", dead: "DEAD"}
    ray = RayState(dashboard.url, "the-ray-token")
    assert (ray.node_state(alive), ray.node_alive(alive)) == ("ALIVE", True)
    assert (ray.node_state(dead), ray.node_alive(dead)) == ("DEAD", False)
    assert (ray.node_state(never), ray.node_alive(never)) == ("UNKNOWN", False)
    assert ray.node_state(alive.upper()) == "ALIVE"
    assert dashboard.requests[0] == {"path": "/api/v0/nodes", "authorization": "Bearer the-ray-token", "query": {
        "filter_keys": ["node_id"], "filter_predicates": ["="], "filter_values": [alive], "detail": ["true"],
        "limit": ["10"], "timeout": ["5"]}}
    # an id no Ray node can have is unknown without asking (and never reaches the query string)
    asked = len(dashboard.requests)
    assert ray.node_state("node-1&filter_keys=state") == "UNKNOWN" and len(dashboard.requests) == asked


NODE_ID = "a" * 56
ROW = {"node_id": NODE_ID, "state": "ALIVE"}


@pytest.mark.parametrize("status, body", [
    (500, b'{"result": false, "msg": "Failed to query the GCS", "data": {}}'),  # the GCS is down
    (401, b"Unauthorized"),  # the token was refused
    (200, b"<html>not the dashboard</html>"),
    (200, b'{"result": false, "msg": "", "data": {"result": {"result": [], "num_filtered": 0}}}'),
    (200, b'{"result": true, "msg": "", "data": {}}'),
    (200, listing([{"node_id": NODE_ID, "state": "ZOMBIE"}])),
    (200, listing([{"node_id": NODE_ID}])),
    (200, listing(["ALIVE"])),
    (200, listing([ROW, {**ROW, "state": "DEAD"}])),  # both: which one?
    (200, listing([], num_filtered=3)),  # cut by the limit: absence proves nothing
], ids=["gcs-down", "unauthorized", "not-json", "failure-flag", "no-listing", "bad-state", "no-state",
        "bad-row", "contradiction", "truncated"])
def test_ray_state_is_none_when_the_answer_is_not_a_node_list(dashboard, status, body):
    dashboard.raw = (status, body)
    assert RayState(dashboard.url, "t").node_state(NODE_ID) is None
    assert RayState(dashboard.url, "t").node_alive(NODE_ID) is None


def test_ray_state_is_none_when_the_dashboard_is_silent_or_gone(dashboard):
    dashboard.delay_s = 1.5
    started = time.monotonic()
    assert RayState(dashboard.url, "t", timeout_s=0.5).node_state(NODE_ID) is None
    assert time.monotonic() - started < 1.4  # the timeout, not the dashboard, decided
    dashboard.close()
    assert RayState(dashboard.url, "t").node_state(NODE_ID) is None  # connection refused


# ---------------------------------------------------------------------------- node_lost, decided by Ray's view
@pytest.fixture
def h(tmp_path: Path, db_url: str, dashboard: Dashboard) -> Iterator[Harness]:
    """The validator harness, its Ray head's dashboard being the stand-in (the dashboard is base + 1)."""
    harness = Harness(tmp_path, db_url)
    harness.settings = harness.settings.model_copy(update={"ray_port_base": dashboard.port - 1})
    harness.restart()
    harness.dashboard = dashboard
    yield harness
    for core in harness.cores:
        core.engine.dispose()


def admit(h: Harness, *miners: Hotkey) -> None:
    """Join, start the node Ray then lists (ALIVE, with the join's resources), report it started."""
    for m in miners:
        _, _, accepted = h.admit(m, node=False)
        h.dashboard.nodes[NODE[m.ss58]] = "ALIVE"
        h.dashboard.resources[NODE[m.ss58]] = {"CPU": 1.0, **accepted.resources}
        h.core.admission.node_started(h.seal(m, "node_started", NodeStarted(node_id=NODE[m.ss58])))


def running_job(h: Harness):
    """A job whose attempt 1 runs on one of Bob and Charlie: (capability, submission, that miner, the other)."""
    cap = h.capability()
    sub = h.submit(cap)
    first = by_hotkey(sub.ticket.miner_hotkey)
    h.fetch(first, sub.ticket.ticket_id)
    h.status(first, sub.job_id, sub.ticket, JobStatus.accepted)
    return cap, sub, first, CHARLIE if first is BOB else BOB


def moved_on(h: Harness, cap, sub, other: Hotkey):
    """Attempt 2 of the job is ticketed to ``other`` at once (whose agent fetches it)."""
    view = h.core.organic.get(cap, sub.job_id)
    assert view.ticket.miner_hotkey == other.ss58 and view.ticket.attempt == 2
    h.fetch(other, view.ticket.ticket_id)
    return view


def report_lost(h: Harness, miner: Hotkey, tickets: list[str]) -> SignedEnvelope:
    env = h.seal(miner, "node_lost", NodeLost(node_id=NODE[miner.ss58], running_tickets=tickets))
    h.core.admission.node_lost(env)
    return env


def advance(h: Harness, s: float) -> None:
    """Let ``s`` seconds pass, both miners heartbeating all along (silence would be an incident)."""
    while s > 0:
        step = min(s, 2)
        h.clock.advance(step)
        s -= step
        for m in (BOB, CHARLIE):
            try:
                h.core.admission.heartbeat(h.seal(m, "heartbeat", Heartbeat()))
            except AdmissionRefused:
                pass  # not admitted in this test


def incidents(h: Harness) -> list[tuple[Any, ...]]:
    i = db.incidents.c
    with h.core.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(i.miner_hotkey, i.kind, i.reason, i.job_id, i.attempt)
                                               .order_by(i.id))]


def test_a_node_lost_that_ray_confirms_is_a_fabric_incident(h, dashboard):
    admit(h, BOB, CHARLIE)
    dashboard.nodes = {NODE[BOB.ss58]: "ALIVE", NODE[CHARLIE.ss58]: "ALIVE"}
    cap, sub, first, other = running_job(h)
    report_lost(h, first, [sub.ticket.ticket_id])
    moved_on(h, cap, sub, other)  # at once: the agent no longer runs it, whatever Ray says
    fabric = (first.ss58, "fabric", "ray_node_lost", sub.job_id, 1)
    assert incidents(h) == [fabric]
    # Ray has not noticed yet (its health checks take ~15 s): no verdict
    advance(h, 10)
    h.core.sweep()
    assert incidents(h) == [fabric] and len(h.core.admission.pending_node_losses()) == 1
    dashboard.nodes[NODE[first.ss58]] = "DEAD"
    advance(h, 5)
    h.core.sweep()
    assert h.core.admission.pending_node_losses() == []
    advance(h, 2 * CONFIRM_S)
    h.core.sweep()
    assert incidents(h) == [fabric]  # never charged


def test_a_node_lost_for_a_node_ray_still_reports_alive_is_charged(h, dashboard):
    admit(h, BOB, CHARLIE)
    dashboard.nodes = {NODE[BOB.ss58]: "ALIVE", NODE[CHARLIE.ss58]: "ALIVE"}
    cap, sub, first, other = running_job(h)
    report = report_lost(h, first, [sub.ticket.ticket_id])
    view = moved_on(h, cap, sub, other)
    advance(h, CONFIRM_S - 1)
    h.core.sweep()
    assert [i[2] for i in incidents(h)] == ["ray_node_lost"]  # not yet: Ray may still be noticing
    advance(h, 2)
    h.core.sweep()
    assert incidents(h) == [(first.ss58, "fabric", "ray_node_lost", sub.job_id, 1),
                            (first.ss58, "miner", "node_lost_but_alive", sub.job_id, 1)]
    h.core.sweep()
    assert len(incidents(h)) == 2  # decided once
    with h.core.engine.connect() as conn:
        evidence = json.loads(conn.execute(sa.select(db.incidents.c.evidence).where(
            db.incidents.c.reason == "node_lost_but_alive")).scalar_one())
    assert evidence["node_lost"] == json.loads(report.model_dump_json())  # the signed report itself
    assert (evidence["ray_state"], evidence["node_id"]) == ("ALIVE", NODE[first.ss58])
    assert {"miner_hotkey": first.ss58, "kind": "miner", "reason": "node_lost_but_alive",
            "job_id": sub.job_id}.items() <= h.core.cluster_status()["incidents"][0].items()

    # the charge counts: with both miners free again, the next job goes to the one that did not lie
    h.core.admission.node_started(h.seal(first, "node_started", NodeStarted(node_id=NODE[first.ss58])))
    h.result(other, sub.job_id, view.ticket)
    assert h.submit(cap).ticket.miner_hotkey == other.ss58


def test_a_node_lost_with_no_work_for_a_live_node_is_charged_to_the_miner(h, dashboard):
    admit(h, BOB)
    dashboard.nodes = {NODE[BOB.ss58]: "ALIVE"}
    report_lost(h, BOB, [])
    advance(h, CONFIRM_S + 1)
    h.core.sweep()
    assert incidents(h) == [(BOB.ss58, "miner", "node_lost_but_alive", None, None)]


def test_a_node_lost_that_ray_cannot_be_asked_about_is_not_charged(h, dashboard):
    admit(h, BOB, CHARLIE)
    dashboard.nodes = {NODE[BOB.ss58]: "ALIVE", NODE[CHARLIE.ss58]: "ALIVE"}
    cap, sub, first, other = running_job(h)
    report_lost(h, first, [sub.ticket.ticket_id])
    moved_on(h, cap, sub, other)
    h.core.sweep()  # ALIVE: ask again later
    dashboard.raw = (500, b'{"result": false, "msg": "Failed to query the GCS", "data": {}}')
    advance(h, CONFIRM_S + 1)
    h.core.sweep()  # at the deadline Ray cannot be asked: no accusation on missing data, but it is said
    assert incidents(h) == [(first.ss58, "fabric", "ray_node_lost", sub.job_id, 1),
                            (first.ss58, "fabric", "ray_node_lost_unconfirmed", None, None)]
    assert h.core.admission.pending_node_losses() == []


def test_a_node_unknown_to_ray_is_a_fabric_incident(h, dashboard):
    admit(h, BOB)
    dashboard.nodes.clear()  # the stand-in GCS no longer lists the node
    report_lost(h, BOB, [])
    h.core.sweep()
    assert h.core.admission.pending_node_losses() == [] and incidents(h) == []


def test_without_a_ray_head_a_node_lost_is_taken_as_said(tmp_path, db_url, dashboard):
    h = Harness(tmp_path, db_url)
    h.settings = h.settings.model_copy(update={"ray_port_base": dashboard.port - 1, "deploy_streams": False})
    h.restart()
    h.dashboard = dashboard
    try:
        admit(h, BOB, CHARLIE)
        cap, sub, first, other = running_job(h)
        report_lost(h, first, [sub.ticket.ticket_id])
        moved_on(h, cap, sub, other)
        advance(h, CONFIRM_S + 1)
        h.core.sweep()
        assert incidents(h) == [(first.ss58, "fabric", "ray_node_lost", sub.job_id, 1)]
        assert dashboard.requests == []
    finally:
        for core in h.cores:
            core.engine.dispose()


# ---------------------------------------------------------------------------- against the real Ray head
URIS = {"miner1": "//Bob", "miner2": "//Charlie"}  # the local stack's dev miners



def status(stack) -> dict[str, Any]:
    return httpx.get(f"{stack.validator_url}/v1/status", timeout=5).json()


@pytest.mark.integration
@pytest.mark.slow
def test_a_miner_that_reports_its_live_node_lost_is_charged_and_its_job_moves_on(stack, engine):
    wait_for(lambda: sum(1 for m in status(stack)["miners"] if m["node_id"] and m["heartbeat_age_s"] < 5) == 2,
             60, "both miners live")
    handle = stack.submit({"image": IMAGE, "command": ["sh", "-c", "sleep 6; echo done"]})
    wait_for(lambda: engine.containers.list(filters={"label": f"rayhorde.job={handle.job_id}"}), 30,
             "the first attempt's container")
    first_ticket, first_miner = handle.ticket_id, handle.miner_hotkey
    name = next(n for n, hk in stack.miners.items() if hk == first_miner)
    node_id = json.loads((stack.home / name / "node.json").read_text())["node_id"]
    ray = RayState(stack.state["dashboard_url"], stack.token)
    assert ray.node_state(node_id) == "ALIVE"

    # the miner lies: a correctly signed node_lost while its node runs
    liar = Hotkey.from_uri(URIS[name])
    validator = ServiceClient(stack.validator_url)
    reported = time.time()
    validator.post_signed("/v1/admission/node_lost", seal(liar, "node_lost", NodeLost(
        node_id=node_id, running_tickets=[first_ticket])))

    view = handle.result(timeout_s=120)  # the job moves on to the other miner at once
    assert view.status.value == "completed" and view.result.stdout == "done\n", [(e.attempt, e.status.value, e.detail) for e in view.history]
    assert view.attempt == 2 and view.miner_hotkey != first_miner
    wait_for(lambda: not engine.containers.list(all=True, filters={"label": f"rayhorde.ticket={first_ticket}"}), 30,
             "the liar's agent to kill the retired attempt")

    def charged():
        return next((i for i in status(stack)["incidents"]
                     if i["job_id"] == handle.job_id and i["reason"] == "node_lost_but_alive"), None)

    incident = wait_for(charged, CONFIRM_S + 30, "the charged incident")
    assert time.time() - reported >= CONFIRM_S - 1  # Ray was given its time to notice a death
    assert {"miner_hotkey": first_miner, "kind": "miner", "attempt": 1}.items() <= incident.items()
    assert ray.node_state(node_id) == "ALIVE"  # it never died

    # the node is still there: its miner reports it up again, and gets work again
    validator.post_signed("/v1/admission/node", seal(liar, "node_started", NodeStarted(node_id=node_id)))
    wait_for(lambda: sum(1 for m in status(stack)["miners"] if m["node_id"] and m["heartbeat_age_s"] < 5) == 2,
             60, "both miners live")


# ---------------------------------------------------------------------------- node_started, checked with Ray
def test_a_node_started_must_be_a_live_ray_node_with_the_admitted_resources(h, dashboard):
    _, _, accepted = h.admit(BOB, node=False)
    node = NODE[BOB.ss58]
    started = h.seal(BOB, "node_started", NodeStarted(node_id=node))
    err = refused(AdmissionRefused, "node_unknown", h.core.admission.node_started, started)  # a made-up id
    assert f"Ray has no ALIVE node {node} (it says UNKNOWN)" in err.message
    dashboard.nodes[node] = "ALIVE"
    dashboard.resources[node] = {"CPU": 1.0, **accepted.resources, "executor:always_on.test": 4.0}  # claims more
    err = refused(AdmissionRefused, "node_mismatch", h.core.admission.node_started,
                  h.seal(BOB, "node_started", NodeStarted(node_id=node)))
    assert "'executor:always_on.test': 4.0" in err.message and "'executor:always_on.test': 1.0" in err.message
    dashboard.resources[node] = {"CPU": 1.0, "miner:" + CHARLIE.ss58: 1.0, "executor:always_on.test": 1.0}
    refused(AdmissionRefused, "node_mismatch", h.core.admission.node_started,  # another miner's node
            h.seal(BOB, "node_started", NodeStarted(node_id=node)))
    assert h.core.cluster_status()["miners"][0]["node_id"] is None  # none of those counted as capacity
    dashboard.resources[node] = {"CPU": 1.0, **accepted.resources}
    h.core.admission.node_started(h.seal(BOB, "node_started", NodeStarted(node_id=node)))
    assert h.core.cluster_status()["miners"][0]["node_id"] == node


def test_a_node_started_is_taken_as_said_when_ray_cannot_be_asked(h, dashboard):
    h.admit(BOB, node=False)
    dashboard.raw = (503, b"down")
    h.core.admission.node_started(h.seal(BOB, "node_started", NodeStarted(node_id=NODE[BOB.ss58])))
    assert h.core.cluster_status()["miners"][0]["node_id"] == NODE[BOB.ss58]
