"""Opening a peer's signed envelope at validator-core's boundary, once, before anything else.

An envelope is accepted only if its kind is the one the endpoint expects, its signer is among
the accepted ones (None: anyone whose signature verifies), its signature verifies, its time is
within ``max_clock_skew_s`` of this validator's clock, and its nonce was never seen (the nonces
live in the database, so a replay is refused after a restart too).
"""

from __future__ import annotations

from typing import Any

from cluster.protocol.envelope import SignedEnvelope, open_envelope
from cluster.protocol.identity import Clock
from cluster.validator.store import DbNonceGuard


class EnvelopeOpener:
    def __init__(self, guard: DbNonceGuard, *, max_skew_s: float, clock: Clock) -> None:
        self.guard = guard
        self.max_skew_s = max_skew_s
        self.clock = clock

    def open(self, env: SignedEnvelope, kind: str, signers: list[str] | None = None) -> dict[str, Any]:
        """The payload of ``env``, or :class:`~cluster.errors.SignatureRejected` naming the problem."""
        return open_envelope(env, kind=kind, max_skew_s=self.max_skew_s, signers=signers, guard=self.guard,
                             clock=self.clock)
