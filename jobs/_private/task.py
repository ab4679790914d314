"""The organic Ray task: it runs on the miner's node and only pokes the local agent.

Its arguments are a ticket id and an attempt number, nothing else: Ray keeps task arguments in
its control store, visible to every cluster member, and the cluster's members include miners.
It returns a small dict the driver may read (``{"ok": True, ...}``, or ``{"ok": False,
"reason", "message"}`` from the agent's error answer); the authoritative result is the signed
one the agent posts to validator-core.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from cluster.protocol.jobs import AGENT_SOCKET_ENV
_clients: dict[str, httpx.Client] = {}


def _agent(sock: str) -> httpx.Client:
    # Worker processes are reused across tasks; building an httpx client (SSL context included)
    # costs ~20 ms, so keep one per socket.
    if sock not in _clients:
        _clients[sock] = httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=None)
    return _clients[sock]


def organic_task(ticket_id: str, attempt: int) -> dict[str, Any]:
    sock = os.environ.get(AGENT_SOCKET_ENV)
    if not sock:
        return {"ok": False, "reason": "no_agent", "message": f"{AGENT_SOCKET_ENV} is not set on this node"}
    try:
        resp = _agent(sock).post("http://agent/v1/run", json={"ticket_id": ticket_id, "attempt": attempt})
        answer = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"ok": False, "reason": "agent_unreachable", "message": f"agent at {sock}: {exc!r}"}
    if resp.status_code < 400:
        return answer
    err = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(err, dict):
        return {"ok": False, "reason": "agent_error",
                "message": f"agent answered {resp.status_code}: {resp.text[:200]}"}
    return {"ok": False, "reason": str(err.get("reason")), "message": str(err.get("message"))}
