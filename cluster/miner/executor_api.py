"""The agent's executor API: an HTTP server on a local unix socket that Ray tasks on this node
poke with a ticket id and attempt (nothing else crosses the fabric, DESIGN §1).

Any process on the node can poke; that is harmless, because the agent runs only tickets that
validator-core hands to THIS miner's signed fetch and that pass :meth:`AgentCore.verify`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cluster.miner.agent import AgentCore
from cluster.errors import ExternalError, Refused

log = logging.getLogger("rayhorde.agent")


class Poke(BaseModel):
    ticket_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    attempt: int = Field(ge=1, le=1000)


def build_executor_app(core: AgentCore) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"ok": False, "reason": "malformed", "message": str(exc.errors()[:3])}, status_code=422)

    @app.post("/v1/run")
    def run(poke: Poke) -> JSONResponse:
        try:
            status = core.run_ticket(poke.ticket_id, poke.attempt)
            return JSONResponse({"ok": True, "ticket_id": poke.ticket_id, "status": status.value})
        except Refused as exc:
            log.warning("ticket %s refused: %s", poke.ticket_id, exc)
            return JSONResponse({"ok": False, "reason": exc.reason, "message": exc.message}, status_code=409)
        except ExternalError as exc:
            log.exception("ticket %s failed", poke.ticket_id)
            return JSONResponse({"ok": False, "reason": "agent_error", "message": str(exc)}, status_code=500)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "miner": core.hotkey.ss58, "running": len(core.running)}

    return app


class ExecutorServer:
    """uvicorn on a unix socket, in a background thread."""

    def __init__(self, core: AgentCore, socket_path: str) -> None:
        config = uvicorn.Config(build_executor_app(core), uds=socket_path, log_level="warning", access_log=False,
                                limit_concurrency=256)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # the agent owns signals
        self.thread = threading.Thread(target=self.server.run, name="executor-api", daemon=True)

    def start(self, timeout_s: float = 15) -> None:
        self.thread.start()
        waited = 0.0
        while not self.server.started:
            if not self.thread.is_alive() or waited > timeout_s:
                raise RuntimeError("executor API did not start")
            threading.Event().wait(0.05)
            waited += 0.05

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
