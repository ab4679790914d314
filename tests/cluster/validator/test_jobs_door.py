"""validator-core's Jobs door on 127.0.0.1: only Ray's Jobs API is forwarded to the dashboard
(here a stand-in dashboard that records what reaches it); the State API, Serve REST and anything
else under /api are refused before they reach Ray; the log tail websocket is relayed."""

from __future__ import annotations

import socket

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from websockets.sync.client import connect

from cluster.miner.serving import BackgroundServer
from cluster.validator.jobs_door import mount_jobs_door

pytestmark = pytest.mark.integration


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def door():
    hits: list[tuple[str, str, str | None, bytes]] = []

    async def anything(request: Request):
        hits.append((request.method, request.url.path, request.headers.get("authorization"), await request.body()))
        return JSONResponse({"path": request.url.path, "query": str(request.url.query)}, status_code=200)

    async def tail(ws):
        hits.append(("WS", ws.url.path, ws.headers.get("authorization"), b""))
        await ws.accept()
        for line in ("line 1\n", "line 2\n"):
            await ws.send_text(line)
        await ws.close()

    dashboard = Starlette(routes=[WebSocketRoute("/api/jobs/{job_id}/logs/tail", tail),
                                  Route("/{path:path}", anything, methods=["GET", "POST", "PUT", "DELETE"])])
    dport, vport = _port(), _port()
    servers = [BackgroundServer(dashboard, name="stand-in dashboard", host="127.0.0.1", port=dport)]
    app = FastAPI()
    mount_jobs_door(app, f"http://127.0.0.1:{dport}")
    servers.append(BackgroundServer(app, name="the Jobs door", host="127.0.0.1", port=vport))
    for s in servers:
        s.start()
    yield f"http://127.0.0.1:{vport}", hits
    for s in reversed(servers):
        s.stop()


def test_the_jobs_api_is_forwarded_with_its_token_and_body(door):
    url, hits = door
    hits.clear()
    auth = {"Authorization": "Bearer ray-token"}
    assert httpx.get(f"{url}/api/version", headers=auth).status_code == 200
    r = httpx.post(f"{url}/api/jobs/", headers=auth, json={"entrypoint": "python hello.py"})
    assert r.status_code == 200 and r.json()["path"] == "/api/jobs/"
    assert httpx.put(f"{url}/api/packages/gcs/_ray_pkg_1.zip", headers=auth, content=b"zip bytes").status_code == 200
    r = httpx.get(f"{url}/api/jobs/raysubmit_1/logs", params={"x": "1"}, headers=auth)
    assert r.json() == {"path": "/api/jobs/raysubmit_1/logs", "query": "x=1"}
    assert [(m, p, a) for m, p, a, _ in hits] == [
        ("GET", "/api/version", "Bearer ray-token"), ("POST", "/api/jobs/", "Bearer ray-token"),
        ("PUT", "/api/packages/gcs/_ray_pkg_1.zip", "Bearer ray-token"),
        ("GET", "/api/jobs/raysubmit_1/logs", "Bearer ray-token")]
    assert hits[2][3] == b"zip bytes"


@pytest.mark.parametrize("path", ["/api/serve/applications/", "/api/v0/nodes", "/api/v0/tasks", "/api/cluster_status",
                                  "/api/actors/kill"])
def test_everything_else_under_api_is_refused_before_ray(door, path):
    url, hits = door
    hits.clear()
    r = httpx.get(f"{url}{path}", headers={"Authorization": "Bearer ray-token"})
    assert r.status_code == 404 and r.json()["error"]["reason"] == "not_served", r.text
    assert "only Ray's Jobs API" in r.json()["error"]["message"]
    assert hits == []


@pytest.mark.parametrize("raw", ["/api/jobs/../serve/applications/", "/api/jobs/%2e%2e/serve/applications/",
                                 "/api/jobs/./../v0/nodes"])
def test_dot_segments_cannot_climb_out_of_the_jobs_api(door, raw):
    url, hits = door
    hits.clear()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # raw: clients would normalise the path
        s.sendall(f"GET {raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    assert hits == []


def test_the_log_tail_websocket_is_relayed(door):
    url, hits = door
    hits.clear()
    with connect(url.replace("http", "ws") + "/api/jobs/raysubmit_1/logs/tail",
                 additional_headers={"Authorization": "Bearer ray-token"}) as ws:
        got = [ws.recv(timeout=10), ws.recv(timeout=10)]
    assert got == ["line 1\n", "line 2\n"]
    assert hits == [("WS", "/api/jobs/raysubmit_1/logs/tail", "Bearer ray-token", b"")]
