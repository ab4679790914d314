"""The one error shape of every rayhorde HTTP door, written and read here.

Every door (validator-core, the miner proxy, the whitelisted apps) answers an error as
``{"error": {"reason": <stable code>, "message": <cause and fix>}}``, built by :func:`error_body`;
a door may add keys beside those two (the LLM app adds OpenAI's ``type``, ``param`` and
``code``, which the official ``openai`` client reads). :func:`raise_for_error` turns such an
answer back into the matching rayhorde exception; :class:`ServiceClient` is the small JSON
client agents, users and the CLI share.

Every client verifies TLS the same way, through :func:`tls_verify`: the CA bundle it is given,
else ``$RAYHORDE_CA_BUNDLE``, else the default CAs. A server whose certificate that bundle does
not vouch for is refused before anything is sent, as :class:`CertificateUntrusted`
(:func:`untrusted_certificate` recognises it under httpx's ``ConnectError``).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import httpx

from cluster.protocol.envelope import SignedEnvelope
from cluster.errors import (
    AdmissionRefused, AppRefused, CapabilityRefused, CertificateUntrusted, ConfigError, ImageDenied, InvalidSpec,
    Refused, RequestRefused, ServiceUnavailable, SignatureRejected, TicketRefused,
)

CA_BUNDLE_ENV = "RAYHORDE_CA_BUNDLE"
_CA_FIX = f"--ca-bundle, ${CA_BUNDLE_ENV} or ca_bundle_path in the role's config"

_BY_REASON: dict[str, type[Refused]] = {
    "not_registered": AdmissionRefused, "banned": AdmissionRefused, "version_mismatch": AdmissionRefused,
    "bad_challenge": AdmissionRefused, "not_admitted": AdmissionRefused, "unknown_executor_class": AdmissionRefused,
    "wrong_validator": AdmissionRefused, "address_mismatch": AdmissionRefused,
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


def framework_error_body(status_code: int, detail: Any, *, method: str, path: str,
                         allow: str | None = None) -> dict[str, Any]:
    """The error body for an HTTP error a door's web framework raised itself, before any handler
    of the door ran (no such route, a method the route does not take, a body that is no JSON), in
    the one shape: the frameworks' own ``{"detail": ...}`` is no rayhorde error. ``allow``: the
    ``Allow`` header of a 405."""
    what = f"{method} {path[:200]}"
    if status_code == 404:
        return error_body("not_found", f"no endpoint {what} on this service; check the URL and the method")
    if status_code == 405:
        takes = f"; it takes {allow}" if allow else ""
        return error_body("method_not_allowed", f"{path[:200]} does not take {method}{takes}")
    if status_code == 400:
        return error_body("malformed", f"{what}: the request could not be read ({detail}); send a JSON body with "
                                       "Content-Type: application/json")
    return error_body(f"http_{status_code}", f"{what}: {detail}")


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


def tls_verify(ca_bundle: str | Path | None = None) -> ssl.SSLContext | bool:
    """What an httpx client's ``verify=`` should be: a context trusting only ``ca_bundle`` (a PEM
    file), else only ``$RAYHORDE_CA_BUNDLE``, else ``True`` (httpx's default CAs). A bundle that is
    missing or unreadable raises :class:`ConfigError`."""
    where = ca_bundle or os.environ.get(CA_BUNDLE_ENV) or None
    if where is None:
        return True
    path = Path(where).expanduser()
    source = "the CA bundle" if ca_bundle else f"${CA_BUNDLE_ENV}"
    if not path.is_file():
        raise ConfigError(f"{source} {path} is not a file; point {_CA_FIX} at the PEM file of the CA that signed "
                          "the services' certificates (or unset it to use the default CAs)")
    try:
        return ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"{source} {path} holds no readable PEM certificate ({exc}); point {_CA_FIX} at the "
                          "CA's certificate file") from exc


def untrusted_certificate(exc: BaseException, url: Any) -> CertificateUntrusted | None:
    """The clear error for ``exc`` if it (or its cause) is a TLS certificate that failed
    verification when connecting to ``url``, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            why = seen.verify_message or str(seen)
            return CertificateUntrusted(f"{url}: its TLS certificate was not trusted ({why}); pass the bundle of "
                                        f"the CA that signed it ({_CA_FIX})")
        seen = seen.__cause__ or seen.__context__
    return None


class ServiceClient:
    """A small JSON client for one rayhorde HTTP service; ``verify`` is a CA bundle (see
    :func:`tls_verify`)."""

    def __init__(self, base_url: str, *, timeout_s: float = 30, transport: httpx.BaseTransport | None = None,
                 headers: dict[str, str] | None = None, verify: str | Path | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport,
                                  headers=headers or {}, verify=tls_verify(verify))

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise (untrusted_certificate(exc, self.base_url) or
                   ServiceUnavailable(f"{self.base_url} did not answer {method} {path}: {exc!r}")) from exc
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
