"""validator-core's writer for Ray Serve's REST API (the head's dashboard, token in a header).

Serve's REST API is declarative over every REST-managed application: each ``PUT
/api/serve/applications/`` carries the whole set, and an application missing from it is
deleted. So there is exactly one writer, holding a lock, and it always sends the
full desired set: the streaming jobs that should run now. ``DELETE`` would shut Serve down for
everyone and is never used. Statuses come back as JSON (``GET``): nothing is unpickled.

Every node's Serve HTTP proxy binds 127.0.0.1 (``proxy_location: EveryNode``): the miner proxy is
the only public door. ``request_timeout_s`` is cluster-wide, so it is set above the longest
allowed request; each stream's own idle timeout lives in the miner proxy.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx

from cluster.errors import ServiceUnavailable

log = logging.getLogger("rayhorde.validator")
BUILDER = "serve_apps.builder:build"


class ServeRest:
    def __init__(self, dashboard_url: str, token: str, *, http_port: int, request_timeout_s: float = 600,
                 timeout_s: float = 30) -> None:
        self.url = dashboard_url.rstrip("/") + "/api/serve/applications/"
        self.http_port = http_port
        self.request_timeout_s = request_timeout_s
        self._http = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {token}"})
        self._lock = threading.Lock()
        self._applied: list[dict[str, Any]] | None = None  # the last set Serve accepted

    def config(self, apps: list[dict[str, Any]]) -> dict[str, Any]:
        return {"proxy_location": "EveryNode",
                "http_options": {"host": "127.0.0.1", "port": self.http_port,
                                 "request_timeout_s": self.request_timeout_s},
                "applications": sorted(apps, key=lambda a: a["name"])}

    def apply(self, apps: list[dict[str, Any]], *, force: bool = False) -> bool:
        """Make ``apps`` the whole set of REST-managed applications; False if it was already."""
        cfg = self.config(apps)
        with self._lock:
            if not force and self._applied == cfg["applications"]:
                return False
            if self._applied is None and not apps and not self.statuses():
                self._applied = []  # nothing deployed, nothing wanted (e.g. after a restart): leave Serve off
                return False
            try:
                resp = self._http.put(self.url, json=cfg)
            except httpx.HTTPError as exc:
                raise ServiceUnavailable(f"Serve REST {self.url} did not answer: {exc!r}") from exc
            if resp.status_code >= 300:
                raise ServiceUnavailable(f"Serve REST refused the config ({resp.status_code}): {resp.text[:300]}")
            self._applied = cfg["applications"]
            log.info("serve: %d streaming apps deployed", len(apps))
            return True

    def statuses(self) -> dict[str, dict[str, str]]:
        """``{app name: {"status": RUNNING | DEPLOYING | DEPLOY_FAILED | ..., "message": ...}}``."""
        try:
            resp = self._http.get(self.url)
            resp.raise_for_status()
            body = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ServiceUnavailable(f"Serve REST {self.url} did not answer: {exc!r}") from exc
        apps = body.get("applications") or {}
        out = {}
        for name, a in apps.items():
            # the application's message is a summary; the replica's error is in its deployment's
            parts = [str(a.get("message", ""))] + [str(d.get("message", "")) for d in
                                                   (a.get("deployments") or {}).values() if d.get("message")]
            out[name] = {"status": str(a.get("status", "")), "message": " | ".join(p for p in parts if p)[-4000:]}
        return out

    def close(self) -> None:
        self._http.close()
