"""The agent's executor API: an HTTP server on a local unix socket, the one door from this
miner's Ray node into the agent (in a sandbox, reached through the socket's group).

* ``POST /v1/run``: a Ray task pokes with a ticket id and attempt: the Ray fabric is untrusted
  and visible to every member, so nothing else crosses it; the agent fetches the spec from
  validator-core itself. Any process on the node can poke; that is harmless, because the agent
  runs only tickets that validator-core hands to THIS miner's signed fetch and that pass
  :meth:`AgentCore.verify`.
* ``POST /v1/stream-volume``: a streaming app reads a file of its job's volume with a request
  signed by its job key (``protocol.streams.VolumeRead``); any other process gets nothing.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from cluster.miner.agent import AgentCore
from cluster.miner.serving import BackgroundServer
from cluster.errors import ExternalError, Refused
from cluster.protocol.http import error_body, framework_error_body
from cluster.protocol.streams import VOLUME_READ_PATH, VolumeRead

log = logging.getLogger("rayhorde.agent")


class Poke(BaseModel):
    ticket_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    attempt: int = Field(ge=1, le=1000)


def build_executor_app(core: AgentCore, volumes: Callable[[VolumeRead], bytes] | None = None) -> FastAPI:
    """``volumes`` answers a signed volume read (``StreamKeeper.read_volume``) or raises Refused."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)  # no 307s: 404s

    @app.exception_handler(HTTPException)  # the framework's own: no route, wrong method, a body that is no JSON
    async def _framework(request: Request, exc: HTTPException) -> JSONResponse:
        body = framework_error_body(exc.status_code, exc.detail, method=request.method, path=request.url.path,
                                    allow=(exc.headers or {}).get("Allow"))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("malformed", str(exc.errors()[:3])), status_code=422)

    @app.post("/v1/run")
    def run(poke: Poke) -> JSONResponse:
        try:
            status = core.run_ticket(poke.ticket_id, poke.attempt)
            return JSONResponse({"ok": True, "ticket_id": poke.ticket_id, "status": status.value})
        except Refused as exc:
            log.warning("ticket %s refused: %s", poke.ticket_id, exc)
            return JSONResponse(error_body(exc.reason, exc.message), status_code=409)
        except ExternalError as exc:
            log.exception("ticket %s failed", poke.ticket_id)
            return JSONResponse(error_body("agent_error", str(exc)), status_code=500)

    @app.post(VOLUME_READ_PATH)
    def read_volume(read: VolumeRead) -> Response:
        try:
            if volumes is None:
                raise Refused("no_volume", "this agent keeps no volumes for streaming jobs")
            return Response(volumes(read), media_type="application/octet-stream")
        except Refused as exc:
            log.warning("volume read of %s/%s refused: %s", read.job_id, read.name, exc)
            return JSONResponse(error_body(exc.reason, exc.message), status_code=exc.status_code or 403)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "miner": core.hotkey.ss58, "running": len(core.running)}

    return app


class ExecutorServer(BackgroundServer):
    """The executor API on a unix socket, in a background thread."""

    def __init__(self, core: AgentCore, socket_path: str, volumes: Callable[[VolumeRead], bytes] | None = None) -> None:
        super().__init__(build_executor_app(core, volumes), name=f"executor API on {socket_path}", uds=socket_path,
                         limit_concurrency=256)
