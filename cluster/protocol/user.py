"""What a user (outside the cluster, holding a hotkey) does with validator-core: get a
capability for drivers (which then read their jobs back with it)."""

from __future__ import annotations

from cluster.protocol.envelope import seal
from cluster.protocol.http import ServiceClient
from cluster.protocol.identity import Hotkey
from cluster.protocol.messages import CapabilityRequest


def request_capability(validator_url: str, hotkey: Hotkey, *, max_jobs: int = 10, ttl_s: int = 600,
                       validator_hotkey: str | None = None) -> str:
    """Ask validator-core for a capability (signed by ``hotkey``); returns the bearer token.

    ``validator_hotkey`` pins the validator; without it the one answering ``/v1/health`` is used.
    """
    client = ServiceClient(validator_url)
    try:
        validator_hotkey = validator_hotkey or client.get("/v1/health")["validator"]
        req = CapabilityRequest(validator=validator_hotkey, max_jobs=max_jobs, ttl_s=ttl_s)
        return client.post_signed("/v1/capabilities", seal(hotkey, "capability_request", req))["capability"]
    finally:
        client.close()
