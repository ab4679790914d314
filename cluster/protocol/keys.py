"""Job and client keys for streaming: ed25519 via bittensor-wallet (sign ~15 us, verify ~36 us).

A key travels as ``{"scheme": "ed25519", "public": <hex>}``; miners' hotkeys stay sr25519 SS58.
"""

from __future__ import annotations

import secrets

from bittensor_wallet import Keypair
from pydantic import BaseModel, Field

ED25519 = 0  # bittensor-wallet crypto_type


class PublicKey(BaseModel):
    scheme: str = "ed25519"
    public: str = Field(pattern=r"^[0-9a-f]{64}$")

    def verify(self, data: bytes, sig_hex: str) -> bool:
        if self.scheme != "ed25519":
            return False
        try:
            return bool(Keypair(public_key=self.public, crypto_type=ED25519).verify(data, bytes.fromhex(sig_hex)))
        except Exception:  # malformed signature or key: not valid
            return False


class SigningKey:
    """An ed25519 private key held by a job (inside its Serve replica) or a streaming client."""

    def __init__(self, seed_hex: str | None = None) -> None:
        self._kp = Keypair.create_from_seed("0x" + (seed_hex or secrets.token_hex(32)), crypto_type=ED25519)

    @property
    def public(self) -> PublicKey:
        return PublicKey(public=self._kp.public_key.hex())

    def sign(self, data: bytes) -> str:
        return self._kp.sign(data).hex()

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public.public[:16]}...)"
