"""The one signed envelope every rayhorde message uses (tickets, admission, heartbeats, results...).

An envelope is ``{v, kind, payload, signer, t, nonce}`` serialised canonically and signed by
``signer``; ``sig`` travels beside it. Receivers call :func:`open_envelope` once, at their
boundary: it checks the kind, the signer, the signature and the clock skew; the caller's
:class:`NonceGuard` refuses replays. Inside the boundary only the checked payload is used.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any, Iterable, Protocol

from pydantic import BaseModel, Field, ValidationError

from cluster.protocol.canonical import canonical_bytes
from cluster.protocol.identity import Clock, Hotkey, system_clock, verify_signature
from cluster.protocol.numbers import UnixNs
from cluster.errors import SignatureRejected

ENVELOPE_VERSION = 1


class SignedEnvelope(BaseModel):
    v: int = ENVELOPE_VERSION
    kind: str
    payload: dict[str, Any]
    signer: str
    t: UnixNs = Field(description="signing time, Unix ns")
    nonce: str
    sig: str

    def body(self) -> dict[str, Any]:
        return {"v": self.v, "kind": self.kind, "payload": self.payload, "signer": self.signer,
                "t": self.t, "nonce": self.nonce}

    def to_token(self) -> str:
        """URL-safe base64 of the envelope JSON, for headers and bearer tokens."""
        return base64.urlsafe_b64encode(self.model_dump_json().encode()).decode().rstrip("=")

    @classmethod
    def from_token(cls, token: str) -> "SignedEnvelope":
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            return cls.model_validate_json(raw)
        except (ValueError, ValidationError) as exc:
            raise SignatureRejected("malformed", f"not a rayhorde signed token ({type(exc).__name__})") from exc


class NonceGuard(Protocol):
    def check_and_record(self, signer: str, nonce: str, t_ns: int) -> bool:
        """Record (signer, nonce); False when it was already seen."""


def seal(hotkey: Hotkey, kind: str, payload: BaseModel | dict[str, Any], *, clock: Clock = system_clock) -> SignedEnvelope:
    """Sign ``payload`` as a message of ``kind`` from ``hotkey``."""
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else dict(payload)
    body = {"v": ENVELOPE_VERSION, "kind": kind, "payload": data, "signer": hotkey.ss58,
            "t": clock(), "nonce": secrets.token_hex(16)}
    return SignedEnvelope(**body, sig=hotkey.sign(canonical_bytes(body)))


def open_envelope(
    env: SignedEnvelope,
    *,
    kind: str,
    max_skew_s: float,
    signers: Iterable[str] | None = None,
    guard: NonceGuard | None = None,
    clock: Clock = system_clock,
    check_time: bool = True,
) -> dict[str, Any]:
    """Check ``env`` and return its payload, or raise :class:`SignatureRejected` naming the problem.

    ``signers``: accepted signers (None = anyone whose signature verifies). ``check_time=False``
    is for long-lived objects (tickets, capabilities) whose expiry is checked by the caller.
    """
    if env.v != ENVELOPE_VERSION:
        raise SignatureRejected("unsupported_version", f"envelope version {env.v}; this build speaks {ENVELOPE_VERSION}")
    if env.kind != kind:
        raise SignatureRejected("wrong_kind", f"expected a '{kind}' message, got '{env.kind}'")
    allowed = None if signers is None else set(signers)
    if allowed is not None and env.signer not in allowed:
        raise SignatureRejected("wrong_signer", f"'{kind}' signed by {env.signer}; expected one of {sorted(allowed)}")
    try:
        signed = canonical_bytes(env.body())
    except TypeError as exc:  # a float, sent as JSON by anyone: it has no canonical form, so no signature covers it
        raise SignatureRejected("invalid_signature", f"'{kind}' holds a float, which no signature covers ({exc}); "
                                "sign integers only") from exc
    if not verify_signature(env.signer, signed, env.sig):
        raise SignatureRejected("invalid_signature", f"signature on '{kind}' does not verify for {env.signer}")
    if check_time:
        skew_s = (env.t - clock()) / 1e9
        if abs(skew_s) > max_skew_s:
            when = "in the future" if skew_s > 0 else "old"
            raise SignatureRejected(
                "clock_skew",
                f"'{kind}' is {abs(skew_s):.1f} s {when}; max skew {max_skew_s:g} s (check the signer's clock)",
            )
    if guard is not None and not guard.check_and_record(env.signer, env.nonce, env.t):
        raise SignatureRejected("replayed", f"'{kind}' nonce {env.nonce} from {env.signer} was already used")
    return env.payload
