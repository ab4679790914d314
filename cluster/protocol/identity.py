"""Hotkeys (sr25519 via bittensor-wallet), wallets in bittensor's layout and the injectable clock.

A hotkey file holds a secret and lives only with the trusted process that owns it: validator-core,
a miner agent or a user's CLI, never a Ray worker (a Ray cluster lets any member run code on any
node, so a secret in a worker is a secret every miner can read).
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Callable

from bittensor_wallet import Keypair, Wallet

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


def default_wallet_path() -> Path:
    """Where bittensor keeps wallets: ``~/.bittensor/wallets``."""
    return Path.home() / ".bittensor" / "wallets"


def load_wallet(path: str | os.PathLike, name: str, hotkey: str = "default") -> Hotkey:
    """The hotkey of bittensor wallet ``name`` (``--wallet.name``), hotkey ``hotkey``
    (``--wallet.hotkey``) under ``path`` (``--wallet.path``), in bittensor's layout
    ``<path>/<name>/hotkeys/<hotkey>``. Never creates anything: a missing or unreadable wallet is a
    :class:`ConfigError` of one line. Encrypted hotkeys are refused (roles run unattended)."""
    root = Path(path).expanduser()
    file = root / name / "hotkeys" / hotkey
    fix = (f"create one with `btcli wallet new_hotkey --wallet.name {name} --wallet.hotkey {hotkey} "
           f"--wallet.path {root}`, or point --wallet.name / --wallet.hotkey / --wallet.path at yours")
    if not file.is_file():
        raise ConfigError(f"no hotkey file {file}; {fix}")
    wallet = Wallet(name=name, hotkey=hotkey, path=str(root))
    try:
        if wallet.hotkey_file.is_encrypted():
            raise ConfigError(f"hotkey file {file} is encrypted; rayhorde runs unattended and needs an "
                              "unencrypted hotkey (the coldkey is never needed)")
        return Hotkey(wallet.get_hotkey())
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"hotkey file {file} is unreadable ({' '.join(str(exc).split())}); {fix}") from exc


def create_dev_wallet(path: str | os.PathLike, name: str, uri: str, hotkey: str = "default") -> Hotkey:
    """The development stack's wallets only: hotkey ``name``/``hotkey`` under ``path`` derived from
    a well-known dev URI (``//Alice``, ``//Bob``...), written once (0600) in bittensor's layout and
    loaded as it is afterwards. Production roles never derive keys; they :func:`load_wallet`."""
    file = Path(path) / name / "hotkeys" / hotkey
    if not file.is_file():
        Path(path).mkdir(parents=True, exist_ok=True, mode=0o700)
        Wallet(name=name, hotkey=hotkey, path=str(path)).set_hotkey(Keypair.create_from_uri(uri), encrypt=False,
                                                                    overwrite=False)
    return load_wallet(path, name, hotkey)


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
