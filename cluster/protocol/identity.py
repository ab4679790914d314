"""Hotkeys (sr25519 via bittensor-wallet), local dev wallets and the injectable clock.

A wallet file holds a secret (mnemonic or dev URI) and lives only with the trusted process that
owns it: validator-core, a miner agent or a user's CLI, never a Ray worker (a Ray cluster lets
any member run code on any node, so a secret in a worker is a secret every miner can read).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Callable

from bittensor_wallet import Keypair

from cluster.errors import ConfigError

Clock = Callable[[], int]
"""Returns the current time in Unix nanoseconds; tests pass a skewed or frozen one."""


def system_clock() -> int:
    return time.time_ns()


def offset_clock(offset_s: float) -> Clock:
    """A clock running ``offset_s`` seconds ahead of (or behind) the system clock."""
    offset_ns = int(offset_s * 1e9)
    return lambda: time.time_ns() + offset_ns


class Hotkey:
    """A signing key. Only trusted processes hold one."""

    def __init__(self, keypair: Keypair) -> None:
        self._kp = keypair

    @classmethod
    def generate(cls) -> "Hotkey":
        return cls(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()))

    @classmethod
    def from_uri(cls, uri: str) -> "Hotkey":
        return cls(Keypair.create_from_uri(uri))

    @property
    def ss58(self) -> str:
        return self._kp.ss58_address

    def sign(self, data: bytes) -> str:
        return self._kp.sign(data).hex()

    def __repr__(self) -> str:  # never print secrets
        return f"Hotkey({self.ss58})"


def verify_signature(ss58: str, data: bytes, sig_hex: str) -> bool:
    """True when ``sig_hex`` is ``ss58``'s sr25519 signature over ``data``; False on any malformation."""
    try:
        sig = bytes.fromhex(sig_hex)
        return bool(Keypair(ss58_address=ss58).verify(data, sig))
    except Exception:  # malformed address or signature: just "not valid"
        return False


def is_ss58(value: str) -> bool:
    try:
        Keypair(ss58_address=value)
        return True
    except Exception:
        return False


def load_or_create_wallet(wallet_dir: str | os.PathLike, name: str, *, uri: str | None = None) -> Hotkey:
    """Load wallet ``name``; create it on first use (from ``uri`` if given, else a fresh mnemonic).

    Files are written 0600, atomically, so a crash never leaves half a wallet.
    """
    path = Path(wallet_dir) / f"{name}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if "uri" in data:
                return Hotkey.from_uri(data["uri"])
            return Hotkey(Keypair.create_from_mnemonic(data["mnemonic"]))
        except Exception as exc:
            raise ConfigError(f"wallet {path} is unreadable ({exc}); delete it to create a new one") from exc
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if uri is not None:
        hotkey, data = Hotkey.from_uri(uri), {"uri": uri}
    else:
        mnemonic = Keypair.generate_mnemonic()
        hotkey, data = Hotkey(Keypair.create_from_mnemonic(mnemonic)), {"mnemonic": mnemonic}
    data.update(name=name, ss58=hotkey.ss58)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)
    return hotkey


def read_or_create_secret(path: Path) -> str:
    """A 32-byte random secret as hex, kept 0600 at ``path`` and created on first use (a Ray
    cluster token, validator-core's probe-key secret). Written beside and renamed: never half written."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(secrets.token_hex(32))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path.read_text().strip()
