"""The Jobs door: stock ``ray job submit --address <validator-core URL>`` from another host.

The head's dashboard (Jobs API, Serve REST, the State API) binds 127.0.0.1 only: on a deployed
validator it must never face the network. Users still submit with Ray's own CLI and SDK, so
validator-core forwards exactly the Jobs API to it, over its own (TLS) door:

    GET  /api/version                 what the SDK checks first
    GET|PUT /api/packages/...         the working dir the SDK uploads
    GET|POST|DELETE /api/jobs/...     submit, status, logs, stop
    WS   /api/jobs/<id>/logs/tail     what ``ray job submit`` follows until the driver ends

Anything else under ``/api`` is refused (404) without reaching Ray. The ``Authorization``
header is passed through unchanged: the dashboard checks the Ray token itself (issue 12 puts a
capability in its place).
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import httpx
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.websockets import WebSocketDisconnect

from cluster.protocol.http import error_body

_ALLOWED = re.compile(r"^(version|packages/[^?]+|jobs/?[^?]*)$")
_REQUEST_HEADERS = ("authorization", "content-type", "content-length", "accept", "user-agent")
_RESPONSE_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


def mount_jobs_door(app: FastAPI, dashboard_url: str, *, timeout_s: float = 120) -> None:
    """Serve the Jobs API of the dashboard at ``dashboard_url`` under ``/api`` on ``app``."""
    base = dashboard_url.rstrip("/")
    http = httpx.AsyncClient(base_url=base, timeout=timeout_s)

    @app.api_route("/api/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD"], include_in_schema=False)
    async def forward(path: str, request: Request) -> Response:
        if not _ALLOWED.match(path) or {".", ".."} & set(path.split("/")) or "%" in path:
            return JSONResponse(error_body("not_served", f"/api/{path} is not served here: validator-core forwards "
                                           "only Ray's Jobs API (/api/version, /api/packages, /api/jobs)"),
                                status_code=404)
        headers = {k: v for k, v in request.headers.items() if k.lower() in _REQUEST_HEADERS}
        upstream = http.build_request(request.method, f"/api/{path}", params=request.query_params, headers=headers,
                                      content=request.stream())
        try:
            resp = await http.send(upstream, stream=True)
        except httpx.TransportError as exc:
            return JSONResponse(error_body("ray_unavailable", f"the validator's Ray head did not answer ({exc!r}); "
                                           "retry in a few seconds"), status_code=503)
        out = {k: v for k, v in resp.headers.items() if k.lower() not in _RESPONSE_HOP}
        return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code, headers=out,
                                 background=BackgroundTask(resp.aclose))

    @app.websocket("/api/jobs/{job_id}/logs/tail")
    async def tail(websocket: WebSocket, job_id: str) -> None:
        auth = websocket.headers.get("authorization")
        await websocket.accept()
        url = base.replace("http", "ws", 1) + f"/api/jobs/{job_id}/logs/tail"
        try:
            async with aiohttp.ClientSession(headers={"Authorization": auth} if auth else None) as session:
                async with session.ws_connect(url) as upstream:
                    async for msg in upstream:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            await websocket.send_text(msg.data)
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            await websocket.send_text(f"[rayhorde] log tail of {job_id} broke off: {exc!r}\n")
        except WebSocketDisconnect:
            return
        await websocket.close()

