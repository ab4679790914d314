"""The Jobs gateway: stock ``ray job submit --address <validator-core URL>`` from another host,
with a capability in place of the Ray token.

The head's dashboard (Jobs API, Serve REST, the State API) binds 127.0.0.1 only: on a deployed
validator it must never face the network. Users still submit with Ray's own CLI and SDK, so
validator-core forwards exactly the Jobs API to it, over its own (TLS) door:

    GET  /api/version                 what the SDK checks first
    GET|PUT /api/packages/...         the working dir the SDK uploads
    POST /api/jobs/                   submit: recorded as the capability's user's submission
    GET  /api/jobs/                   list: that user's submissions only
    GET|DELETE /api/jobs/<id>[/logs]  status, logs, delete; POST /api/jobs/<id>/stop: stop
    WS   /api/jobs/<id>/logs/tail     what ``ray job submit`` follows until the driver ends

Users never hold the Ray token: every request carries a capability of this validator as
``Authorization: Bearer <capability>`` (``RAY_AUTH_TOKEN=<capability>`` with Ray's SDK and CLI),
and the gateway sends the real token to the dashboard. Nor does the capability reach Ray: a
submission's runtime env is in the job table every member reads, so the gateway gives the driver
a scope for this one submission instead (``RAYHORDE_CAPABILITY``, and ``RAYHORDE_VALIDATOR_URL``
if unset: a plain ``ray job submit -- python hello.py`` needs no runtime env), swaps it for any
env value equal to the capability, and refuses a submission that has the capability anywhere else
(entrypoint, metadata). A submission belongs to the capability's
user (recorded before Ray sees it, in validator-core's database); another user's id answers 404,
as if it did not exist. Anything else under ``/api``, and any path with dot segments or escapes,
is refused without reaching Ray.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import Callable

import aiohttp
import httpx
import sqlalchemy as sa
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.websockets import WebSocketDisconnect

from cluster.errors import Refused
from cluster.protocol.http import CA_BUNDLE_ENV, error_body
from cluster.protocol.jobs import CAPABILITY_ENV, VALIDATOR_URL_ENV
from cluster.protocol.messages import Capability
from cluster.validator import store as db

_ALLOWED = re.compile(r"^(version|packages/[^?]+|jobs/?[^?]*)$")
_ONE_JOB = re.compile(r"^jobs/(?P<id>[A-Za-z0-9_\-]{1,128})(?P<rest>|/logs|/stop)$")
_REQUEST_HEADERS = ("content-type", "content-length", "accept", "user-agent")
_RESPONSE_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
MAX_SUBMIT_BYTES = 1 << 20  # a submit request is JSON (entrypoint, runtime env): the working dir goes to /packages


class SubmissionOwners:
    """Which user submitted which Ray job through the gateway (validator-core's database)."""

    def __init__(self, engine: sa.Engine, clock: Callable[[], int]) -> None:
        self.engine = engine
        self.clock = clock

    def claim(self, submission_id: str, cap: Capability) -> bool:
        """Record ``submission_id`` as ``cap``'s user's; False if it is taken already."""
        try:
            with self.engine.begin() as conn:
                conn.execute(db.gateway_submissions.insert().values(
                    submission_id=submission_id, user_hotkey=cap.user, capability_id=cap.capability_id,
                    created_ns=self.clock()))
            return True
        except sa.exc.IntegrityError:
            return False

    def release(self, submission_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(db.gateway_submissions.delete().where(
                db.gateway_submissions.c.submission_id == submission_id))

    def owner(self, submission_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(db.gateway_submissions.c.user_hotkey).where(
                db.gateway_submissions.c.submission_id == submission_id)).scalar_one_or_none()

    def of(self, user: str) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(db.gateway_submissions.c.submission_id).where(
                db.gateway_submissions.c.user_hotkey == user)).scalars())


def mount_jobs_door(app: FastAPI, dashboard_url: str, *, ray_token: str,
                    authorize: Callable[[str | None], Capability], owners: SubmissionOwners,
                    scope: Callable[[Capability, str], str], validator_url: str | None = None,
                    ca_bundle: str | None = None, timeout_s: float = 120) -> None:
    """Serve the Jobs API of the dashboard at ``dashboard_url`` under ``/api`` on ``app``;
    ``authorize`` turns a bearer token into a capability or raises a refusal; ``scope(cap,
    submission_id)`` mints the token the submission's driver gets instead of the capability.
    Drivers reach validator-core at ``validator_url`` trusting ``ca_bundle``: a path on the head's
    host (the one its sandbox shows), which replaces any bundle path the user's host named."""
    base = dashboard_url.rstrip("/")
    http = httpx.AsyncClient(base_url=base, timeout=timeout_s, headers={"Authorization": f"Bearer {ray_token}"})

    def _token(authorization: str | None) -> str | None:
        return authorization[len("Bearer "):].strip() if authorization and authorization.startswith("Bearer ") else None

    def _cap(authorization: str | None) -> Capability:
        return authorize(_token(authorization))

    def _not_yours(submission_id: str) -> JSONResponse:
        return JSONResponse(error_body("unknown_submission", f"no submission {submission_id} for this capability's "
                                       "user: list yours with `ray job list`"), status_code=404)

    async def _send(method: str, path: str, request: Request, content) -> httpx.Response | JSONResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in _REQUEST_HEADERS
                   and not (k.lower() == "content-length" and isinstance(content, bytes))}  # rewritten body
        upstream = http.build_request(method, f"/api/{path}", params=request.query_params, headers=headers,
                                      content=content)
        try:
            return await http.send(upstream, stream=True)
        except httpx.TransportError as exc:
            return JSONResponse(error_body("ray_unavailable", f"the validator's Ray head did not answer ({exc!r}); "
                                           "retry in a few seconds"), status_code=503)

    def _relay(resp: httpx.Response) -> StreamingResponse:
        out = {k: v for k, v in resp.headers.items() if k.lower() not in _RESPONSE_HOP}
        return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code, headers=out,
                                 background=BackgroundTask(resp.aclose))

    @app.api_route("/api/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD"], include_in_schema=False)
    async def forward(path: str, request: Request) -> Response:
        if not _ALLOWED.match(path) or {".", ".."} & set(path.split("/")) or "%" in path:
            return JSONResponse(error_body("not_served", f"/api/{path} is not served here: validator-core forwards "
                                           "only Ray's Jobs API (/api/version, /api/packages, /api/jobs)"),
                                status_code=404)
        try:
            cap = _cap(request.headers.get("authorization"))
        except Refused as exc:
            return JSONResponse(error_body(exc.reason, f"{exc.message} (the Jobs gateway takes a capability, "
                                           "e.g. RAY_AUTH_TOKEN=<capability>)"), status_code=exc.status_code or 401)
        if path.rstrip("/") == "jobs":
            if request.method == "POST":
                return await _submit(path, request, cap)
            if request.method == "GET":
                return await _list(path, request, cap)
        one = _ONE_JOB.match(path)
        if path.startswith("jobs") and one is None:
            return JSONResponse(error_body("not_served", f"/api/{path} is not part of the Jobs API"), status_code=404)
        if one is not None and owners.owner(one["id"]) != cap.user:
            return _not_yours(one["id"])
        resp = await _send(request.method, path, request, request.stream())
        return resp if isinstance(resp, JSONResponse) else _relay(resp)

    async def _submit(path: str, request: Request, cap: Capability) -> Response:
        raw = await request.body()
        if len(raw) > MAX_SUBMIT_BYTES:
            return JSONResponse(error_body("too_large", f"a submit request is at most {MAX_SUBMIT_BYTES} bytes; "
                                           "put files in the working dir"), status_code=413)
        try:
            body = json.loads(raw)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return JSONResponse(error_body("malformed", "a submit request is a JSON object"), status_code=422)
        sid = body.get("submission_id") or f"raysubmit_{secrets.token_hex(8)}"
        if not isinstance(sid, str) or not _ONE_JOB.match(f"jobs/{sid}"):
            return JSONResponse(error_body("malformed", "submission_id: letters, digits, _ and - only"), status_code=422)
        runtime_env = body.get("runtime_env") or {}
        env_vars = runtime_env.get("env_vars") or {} if isinstance(runtime_env, dict) else None
        if not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values()):
            return JSONResponse(error_body("malformed", "runtime_env must be an object and its env_vars an object "
                                           "of strings"), status_code=422)
        token = _token(request.headers.get("authorization")) or ""
        kept = {k: v for k, v in env_vars.items() if v != token}
        if token and token in json.dumps({**body, "runtime_env": {**runtime_env, "env_vars": kept}}):
            return JSONResponse(error_body("capability_exposed", "the capability appears in this submission outside "
                                           f"runtime_env env_vars; every cluster member reads it there. Drop it: the "
                                           f"driver gets a scope of its own as ${CAPABILITY_ENV}"), status_code=422)
        if not owners.claim(sid, cap):  # recorded before Ray sees it: no window in which it is nobody's
            return JSONResponse(error_body("submission_exists", f"submission {sid} exists; pick another id"),
                                status_code=409)
        scoped = scope(cap, sid)
        env_vars = {k: scoped if v == token else v for k, v in env_vars.items()}
        env_vars.setdefault(CAPABILITY_ENV, scoped)
        if validator_url:
            env_vars.setdefault(VALIDATOR_URL_ENV, validator_url)
        if ca_bundle:
            env_vars[CA_BUNDLE_ENV] = ca_bundle
        body.update(submission_id=sid, runtime_env={**runtime_env, "env_vars": env_vars})
        resp = await _send("POST", path, request, json.dumps(body).encode())
        if isinstance(resp, JSONResponse) or resp.status_code >= 400:
            owners.release(sid)  # Ray did not take it
        return resp if isinstance(resp, JSONResponse) else _relay(resp)

    async def _list(path: str, request: Request, cap: Capability) -> Response:
        resp = await _send("GET", path, request, None)
        if isinstance(resp, JSONResponse):
            return resp
        try:
            jobs = json.loads(await resp.aread())
        finally:
            await resp.aclose()
        mine = owners.of(cap.user)
        return JSONResponse([j for j in jobs if isinstance(j, dict) and j.get("submission_id") in mine]
                            if isinstance(jobs, list) else [], status_code=resp.status_code)

    @app.websocket("/api/jobs/{job_id}/logs/tail")
    async def tail(websocket: WebSocket, job_id: str) -> None:
        try:
            cap = _cap(websocket.headers.get("authorization"))
        except Refused:
            await websocket.close(code=4401)
            return
        if owners.owner(job_id) != cap.user:
            await websocket.close(code=4404)
            return
        await websocket.accept()
        url = base.replace("http", "ws", 1) + f"/api/jobs/{job_id}/logs/tail"
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ray_token}"}) as session:
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

