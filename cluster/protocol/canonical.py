"""The one canonical serialisation of anything signed.

JSON, UTF-8, keys sorted, no insignificant whitespace, integers for times (Unix ns), lowercase
hex for hashes. Signatures are over these exact bytes, so two implementations that follow
these rules produce the same bytes for the same object.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

NS = 1_000_000_000  # nanoseconds per second: every time rayhorde signs or stores is integer Unix ns


def canonical_bytes(obj: Any) -> bytes:
    """Canonical JSON bytes of ``obj``; floats are refused because their text form drifts."""
    _refuse_floats(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _refuse_floats(obj: Any) -> None:
    if isinstance(obj, float):
        raise TypeError("floats are not allowed in signed objects; use integers (ns, bytes, milli-units)")
    if isinstance(obj, dict):
        for value in obj.values():
            _refuse_floats(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _refuse_floats(value)
