"""The one error shape of every rayhorde HTTP door, written and read here.

Every door (validator-core, the miner proxy, the whitelisted apps) answers an error as
``{"error": {"reason": <stable code>, "message": <cause and fix>}}``, built by :func:`error_body`;
a door may add keys beside those two (the LLM app adds OpenAI's ``type``, ``param`` and
``code``, which the official ``openai`` client reads). :func:`raise_for_error` turns such an
answer back into the matching rayhorde exception; :class:`ServiceClient` is the small JSON
client agents, users and the CLI share.
"""

from __future__ import annotations

from typing import Any

import httpx

from cluster.protocol.envelope import SignedEnvelope
from cluster.errors import (
    AdmissionRefused, AppRefused, CapabilityRefused, ImageDenied, InvalidSpec, Refused, RequestRefused,
    ServiceUnavailable, SignatureRejected, TicketRefused,
)

_BY_REASON: dict[str, type[Refused]] = {
    "not_registered": AdmissionRefused, "banned": AdmissionRefused, "version_mismatch": AdmissionRefused,
    "bad_challenge": AdmissionRefused, "not_admitted": AdmissionRefused, "unknown_executor_class": AdmissionRefused,
    "wrong_validator": AdmissionRefused,
    "not_whitelisted": CapabilityRefused, "capability_expired": CapabilityRefused, "over_budget": CapabilityRefused,
    "invalid_capability": CapabilityRefused, "no_capability": CapabilityRefused, "ttl_too_long": CapabilityRefused,
    "unknown_ticket": TicketRefused, "wrong_miner": TicketRefused, "ticket_closed": TicketRefused,
    "invalid_signature": SignatureRejected, "replayed": SignatureRejected, "clock_skew": SignatureRejected,
    "unsigned": SignatureRejected, "wrong_signer": SignatureRejected, "malformed": Refused,
    "wrong_job": RequestRefused, "wrong_target": RequestRefused, "body_mismatch": RequestRefused,
    "unknown_client_key": RequestRefused,
    "image_denied": ImageDenied,
    "app_not_whitelisted": AppRefused, "weights_digest_mismatch": AppRefused,
}


def error_body(reason: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of an error answer: ``reason`` a stable code, ``message`` the cause and the
    fix, ``extra`` keys beside them."""
    return {"error": {"reason": reason, "message": message, **extra}}


def raise_for_error(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        reason, message = str(err["reason"]), str(err["message"])
    except Exception:
        raise ServiceUnavailable(f"{resp.request.method} {resp.request.url} answered {resp.status_code}: "
                                 f"{resp.text[:200]}") from None
    if reason == "invalid_spec":
        raise InvalidSpec(message)
    raise _BY_REASON.get(reason, Refused)(reason, message, status_code=resp.status_code)


class ServiceClient:
    """A small JSON client for one rayhorde HTTP service."""

    def __init__(self, base_url: str, *, timeout_s: float = 30, transport: httpx.BaseTransport | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport,
                                  headers=headers or {})

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"{self.base_url} did not answer {method} {path}: {exc!r}") from exc
        raise_for_error(resp)
        return resp.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=json, **kwargs)

    def post_signed(self, path: str, env: SignedEnvelope, **kwargs: Any) -> Any:
        return self.request("POST", path, json=env.model_dump(mode="json"), **kwargs)

    def close(self) -> None:
        self._http.close()
