"""Small helpers the server-starting tests share: a free loopback port, and waiting for a
condition with a liveness bound (never a speed assertion)."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``predicate()``'s first truthy value within ``timeout_s``; else fail naming ``what``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
