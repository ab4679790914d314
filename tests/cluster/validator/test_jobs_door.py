"""validator-core's Jobs gateway on 127.0.0.1, in front of a stand-in dashboard that records what
reaches it: users authenticate with a capability and never see the Ray token (the gateway sends
it); each user sees, logs and stops only their own submissions; everything else under /api, and
any path that tries to climb out of the Jobs API, is refused before it reaches Ray."""

from __future__ import annotations

import json
import shutil
import socket

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from cluster.chain.local import LocalChain
from cluster.devstack.certs import make_ca
from cluster.miner.serving import BackgroundServer
from cluster.protocol.envelope import SignedEnvelope, seal
from cluster.protocol.identity import Hotkey
from cluster.protocol.messages import Capability, CapabilityRequest
from cluster.resources import config_path
from cluster.settings import ValidatorSettings
from cluster.validator.app import build_app
from cluster.validator.core import ValidatorCore
from tests.support.net import free_port

pytestmark = pytest.mark.integration
ALICE, DAVE, EVE = (Hotkey.from_uri(u) for u in ("//Alice", "//Dave", "//Eve"))
RAY_TOKEN = "the-cluster-ray-token"



@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway")
    hits: list[tuple[str, str, str | None, bytes]] = []
    submitted = [{"submission_id": "raysubmit_not_via_gateway", "status": "RUNNING"}]

    async def anything(request: Request):
        body = await request.body()
        hits.append((request.method, request.url.path, request.headers.get("authorization"), body))
        if request.method == "POST" and request.url.path == "/api/jobs/":
            sub = json.loads(body)
            if sub["entrypoint"] == "refuse me":
                return JSONResponse({"error": "bad runtime env"}, status_code=400)
            submitted.append({"submission_id": sub["submission_id"], "status": "PENDING"})
            return JSONResponse({"job_id": None, "submission_id": sub["submission_id"]})
        if request.method == "GET" and request.url.path == "/api/jobs/":
            return JSONResponse(submitted)
        return JSONResponse({"path": request.url.path, "query": str(request.url.query)})

    async def tail(ws):
        hits.append(("WS", ws.url.path, ws.headers.get("authorization"), b""))
        await ws.accept()
        for line in ("line 1\n", "line 2\n"):
            await ws.send_text(line)
        await ws.close()

    dashboard = Starlette(routes=[WebSocketRoute("/api/jobs/{job_id}/logs/tail", tail),
                                  Route("/{path:path}", anything, methods=["GET", "POST", "PUT", "DELETE"])])
    shutil.copy(config_path("metagraph.local.json"), root / "metagraph.json")
    dport, vport = free_port(), free_port()
    settings = ValidatorSettings(home=root, wallet_path=root, db_url=f"sqlite:///{root / 'v.db'}", deploy_streams=False,
                                 host="127.0.0.1", port=vport, ca_bundle_path=make_ca(root / "ca").cert_path,
                                 metagraph_path=root / "metagraph.json", users=[DAVE.ss58, EVE.ss58])
    core = ValidatorCore(settings, hotkey=ALICE, chain=LocalChain(settings.metagraph_path), ray_token=RAY_TOKEN)
    caps = {u: core.capabilities.issue(seal(u, "capability_request", CapabilityRequest(
        validator=ALICE.ss58, max_jobs=20, ttl_s=3600))) for u in (DAVE, EVE)}
    servers = [BackgroundServer(dashboard, name="stand-in dashboard", host="127.0.0.1", port=dport),
               BackgroundServer(build_app(core, jobs_dashboard_url=f"http://127.0.0.1:{dport}", ray_token=RAY_TOKEN),
                                name="validator-core", host="127.0.0.1", port=vport)]
    for s in servers:
        s.start()
    yield f"http://127.0.0.1:{vport}", hits, {"dave": caps[DAVE], "eve": caps[EVE]}
    for s in reversed(servers):
        s.stop()


def _as(cap: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {cap}"}


def test_a_submission_is_the_users_own_and_ray_sees_only_the_gateways_token(gateway):
    url, hits, caps = gateway
    hits.clear()
    assert httpx.get(f"{url}/api/version", headers=_as(caps["dave"])).status_code == 200
    assert httpx.put(f"{url}/api/packages/gcs/_ray_pkg_1.zip", headers=_as(caps["dave"]),
                     content=b"zip bytes").status_code == 200
    r = httpx.post(f"{url}/api/jobs/", headers=_as(caps["dave"]), json={"entrypoint": "python hello.py"})
    assert r.status_code == 200, r.text
    sid = r.json()["submission_id"]
    assert sid.startswith("raysubmit_")
    assert {a for _, _, a, _ in hits} == {f"Bearer {RAY_TOKEN}"}  # the capability never reaches Ray
    assert hits[1][3] == b"zip bytes" and json.loads(hits[2][3])["submission_id"] == sid
    # the owner lists, reads, logs and stops it; nobody else sees it
    assert [j["submission_id"] for j in httpx.get(f"{url}/api/jobs/", headers=_as(caps["dave"])).json()] == [sid]
    assert httpx.get(f"{url}/api/jobs/", headers=_as(caps["eve"])).json() == []
    for method, path in (("GET", f"/api/jobs/{sid}"), ("GET", f"/api/jobs/{sid}/logs"),
                         ("POST", f"/api/jobs/{sid}/stop"), ("DELETE", f"/api/jobs/{sid}")):
        hits.clear()
        other = httpx.request(method, f"{url}{path}", headers=_as(caps["eve"]))
        assert other.status_code == 404 and other.json()["error"]["reason"] == "unknown_submission", other.text
        assert hits == []
        assert httpx.request(method, f"{url}{path}", headers=_as(caps["dave"])).status_code == 200
        assert hits == [(method, path, f"Bearer {RAY_TOKEN}", b"")]
    # a submission made around the gateway is nobody's here
    assert httpx.get(f"{url}/api/jobs/raysubmit_not_via_gateway", headers=_as(caps["dave"])).status_code == 404


@pytest.mark.parametrize("bearer, reason", [(None, "no_capability"), (RAY_TOKEN, "invalid_capability"),
                                            ("eyJub3QiOiJzaWduZWQifQ", "invalid_capability")])
def test_without_a_capability_nothing_reaches_ray(gateway, bearer, reason):
    url, hits, _ = gateway
    hits.clear()
    headers = _as(bearer) if bearer else {}
    for method, path in (("GET", "/api/version"), ("GET", "/api/jobs/"), ("POST", "/api/jobs/")):
        r = httpx.request(method, f"{url}{path}", headers=headers, json={"entrypoint": "x"})
        assert r.status_code == 401 and r.json()["error"]["reason"] == reason, r.text
        assert "capability" in r.json()["error"]["message"]
    assert hits == []


def test_a_submission_ray_refuses_is_nobodys_and_ids_are_not_taken_twice(gateway):
    url, hits, caps = gateway
    r = httpx.post(f"{url}/api/jobs/", headers=_as(caps["dave"]),
                   json={"entrypoint": "refuse me", "submission_id": "raysubmit_mine"})
    assert r.status_code == 400
    r = httpx.post(f"{url}/api/jobs/", headers=_as(caps["eve"]), json={"entrypoint": "ok", "submission_id": "raysubmit_mine"})
    assert r.status_code == 200  # released when Ray refused it: Eve may use the id
    again = httpx.post(f"{url}/api/jobs/", headers=_as(caps["dave"]), json={"entrypoint": "ok", "submission_id": "raysubmit_mine"})
    assert again.status_code == 409 and again.json()["error"]["reason"] == "submission_exists"
    bad = httpx.post(f"{url}/api/jobs/", headers=_as(caps["dave"]), json={"entrypoint": "ok", "submission_id": "../x"})
    assert bad.status_code == 422


@pytest.mark.parametrize("path", ["/api/serve/applications/", "/api/v0/nodes", "/api/v0/tasks", "/api/cluster_status",
                                  "/api/actors/kill", "/api/jobs/x/y/z"])
def test_everything_else_under_api_is_refused_before_ray(gateway, path):
    url, hits, caps = gateway
    hits.clear()
    r = httpx.get(f"{url}{path}", headers=_as(caps["dave"]))
    assert r.status_code == 404 and r.json()["error"]["reason"] == "not_served", r.text
    assert hits == []


@pytest.mark.parametrize("raw", ["/api/jobs/../serve/applications/", "/api/jobs/%2e%2e/serve/applications/",
                                 "/api/jobs/./../v0/nodes"])
def test_dot_segments_cannot_climb_out_of_the_jobs_api(gateway, raw):
    url, hits, caps = gateway
    hits.clear()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # raw: clients would normalise the path
        s.sendall(f"GET {raw} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {caps['dave']}\r\n"
                  "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    assert hits == []


def test_the_log_tail_is_relayed_to_its_owner_only(gateway):
    url, hits, caps = gateway
    sid = httpx.post(f"{url}/api/jobs/", headers=_as(caps["dave"]), json={"entrypoint": "tail me"}).json()["submission_id"]
    hits.clear()
    ws_url = url.replace("http", "ws") + f"/api/jobs/{sid}/logs/tail"
    with pytest.raises(InvalidStatus):  # closed before the handshake completes
        with connect(ws_url, additional_headers=_as(caps["eve"])) as ws:
            ws.recv(timeout=10)
    assert hits == []
    with connect(ws_url, additional_headers=_as(caps["dave"])) as ws:
        got = [ws.recv(timeout=10), ws.recv(timeout=10)]
    assert got == ["line 1\n", "line 2\n"]
    assert hits == [("WS", f"/api/jobs/{sid}/logs/tail", f"Bearer {RAY_TOKEN}", b"")]


def _scope_of(token: str) -> Capability:
    return Capability.model_validate(SignedEnvelope.from_token(token).payload)


def test_the_driver_gets_a_scope_of_its_own_never_the_capability(gateway):
    url, hits, caps = gateway
    hits.clear()
    r = httpx.post(f"{url}/api/jobs/", headers=_as(caps["dave"]), json={
        "entrypoint": "python hello.py", "runtime_env": {"env_vars": {"RAYHORDE_CAPABILITY": caps["dave"],
                                                                      "MINE": "kept",
                                                                      "RAYHORDE_CA_BUNDLE": "/home/dave/ca.pem"}}})
    assert r.status_code == 200, r.text
    sid = r.json()["submission_id"]
    [(_, _, _, body)] = [h for h in hits if h[1] == "/api/jobs/"]
    assert caps["dave"].encode() not in body  # not in what Ray stores, where every member reads it
    env = json.loads(body)["runtime_env"]["env_vars"]
    assert env["MINE"] == "kept" and env["RAYHORDE_VALIDATOR_URL"] == url  # set for the driver when unset
    # the driver runs on the head: it trusts the head's CA bundle (shown in its sandbox), not a user's path
    assert env["RAYHORDE_CA_BUNDLE"].endswith("/gateway0/ca/ca.crt")  # validator-core's ca_bundle_path
    scope = _scope_of(env["RAYHORDE_CAPABILITY"])
    assert (scope.scope, scope.submission_id, scope.user) == ("submission", sid, DAVE.ss58)
    # with no runtime env at all, the driver still gets both
    r = httpx.post(f"{url}/api/jobs/", headers=_as(caps["dave"]), json={"entrypoint": "python hello.py"})
    env = json.loads([h for h in hits if h[1] == "/api/jobs/"][-1][3])["runtime_env"]["env_vars"]
    assert _scope_of(env["RAYHORDE_CAPABILITY"]).submission_id == r.json()["submission_id"]


def test_a_submission_scope_starts_and_sees_its_own_jobs_only(gateway):
    url, hits, caps = gateway
    users_job = httpx.post(f"{url}/v1/jobs", headers=_as(caps["dave"]), json={"image": "busybox", "command": ["true"]})
    assert users_job.status_code == 200, users_job.text
    httpx.post(f"{url}/api/jobs/", headers=_as(caps["dave"]), json={"entrypoint": "python hello.py"})
    scope = json.loads([h for h in hits if h[1] == "/api/jobs/"][-1][3])["runtime_env"]["env_vars"][
        "RAYHORDE_CAPABILITY"]
    mine = httpx.post(f"{url}/v1/jobs", headers=_as(scope), json={"image": "busybox", "command": ["true"]})
    assert mine.status_code == 200, mine.text
    assert httpx.get(f"{url}/v1/jobs/{mine.json()['job_id']}", headers=_as(scope)).status_code == 200
    assert [j["job_id"] for j in httpx.get(f"{url}/v1/jobs", headers=_as(scope)).json()] == [mine.json()["job_id"]]
    other = httpx.get(f"{url}/v1/jobs/{users_job.json()['job_id']}", headers=_as(scope))
    assert other.status_code == 404  # the user's other jobs do not exist for a driver's scope
    assert httpx.get(f"{url}/v1/jobs/{mine.json()['job_id']}", headers=_as(caps["dave"])).status_code == 200
    for method, path in (("GET", "/v1/streams"), ("POST", f"/v1/jobs/{users_job.json()['job_id']}/scope"),
                         ("GET", "/api/jobs/"), ("GET", "/api/version")):
        r = httpx.request(method, f"{url}{path}", headers=_as(scope))
        assert r.status_code == 403 and r.json()["error"]["reason"] == "scope_denied", (path, r.text)


def test_a_capability_anywhere_else_in_a_submission_is_refused_before_ray(gateway):
    url, hits, caps = gateway
    hits.clear()
    for body in ({"entrypoint": f"RAYHORDE_CAPABILITY={caps['dave']} python hello.py"},
                 {"entrypoint": "python hello.py", "metadata": {"note": caps["dave"]}},
                 {"entrypoint": "x", "runtime_env": {"env_vars": {"AUTH": f"Bearer {caps['dave']}"}}}):
        r = httpx.post(f"{url}/api/jobs/", headers=_as(caps["dave"]), json=body)
        assert r.status_code == 422 and r.json()["error"]["reason"] == "capability_exposed", r.text
    assert hits == []
    r = httpx.post(f"{url}/api/jobs/", headers=_as(caps["dave"]), json={"entrypoint": "x", "runtime_env": "nope"})
    assert r.status_code == 422 and r.json()["error"]["reason"] == "malformed"


def test_a_job_scope_follows_its_one_job(gateway):
    url, _, caps = gateway
    job = httpx.post(f"{url}/v1/jobs", headers=_as(caps["dave"]), json={"image": "busybox", "command": ["true"]}).json()
    other = httpx.post(f"{url}/v1/jobs", headers=_as(caps["dave"]), json={"image": "busybox", "command": ["true"]}).json()
    assert httpx.post(f"{url}/v1/jobs/{job['job_id']}/scope", headers=_as(caps["eve"])).status_code == 404
    scope = httpx.post(f"{url}/v1/jobs/{job['job_id']}/scope", headers=_as(caps["dave"])).json()["scope"]
    assert _scope_of(scope).scope == "job" and _scope_of(scope).max_jobs == 0
    assert httpx.get(f"{url}/v1/jobs/{job['job_id']}", headers=_as(scope)).status_code == 200
    watched = httpx.post(f"{url}/v1/jobs/watch", headers=_as(scope),
                         json={"known": {job["job_id"]: None, other["job_id"]: None}, "wait_s": 0}).json()
    assert [s["job_id"] for s in watched] == [job["job_id"]]
    assert httpx.get(f"{url}/v1/jobs/{other['job_id']}", headers=_as(scope)).status_code == 404
    start = httpx.post(f"{url}/v1/jobs", headers=_as(scope), json={"image": "busybox", "command": ["true"]})
    assert start.status_code == 403 and start.json()["error"]["reason"] == "scope_denied"
    assert httpx.post(f"{url}/v1/jobs/{job['job_id']}/cancel", headers=_as(scope)).json()["status"] == "cancelled"
