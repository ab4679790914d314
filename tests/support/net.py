"""Small helpers the server-starting tests share: a free loopback port, waiting for a condition
with a liveness bound (never a speed assertion), and what a door read of a hostile body (a raw
client that sends until answered, an ASGI wrapper counting the bytes the app pulled, the RSS)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
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


class CountingReads:
    """ASGI wrapper: how many body bytes the app pulled through ``receive``."""

    def __init__(self, app) -> None:
        self.app, self.read = app, 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            self.read += len(message.get("body", b""))
            return message
        await self.app(scope, counted, send)


def send_body(port: int, path: str, total: int, *, chunked: bool, headers: str = "",
              method: str = "POST") -> tuple[int, int]:
    """Send up to ``total`` body bytes (made lazily, 1 MiB at a time) until the server answers;
    return (status, bytes sent)."""
    chunk = b"x" * 2**20
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n{headers}"
                  "\r\n".encode())
        sent = 0
        s.setblocking(False)
        answer = b""
        while sent < total:
            try:
                answer += s.recv(65536)
                break  # the server answered: stop sending
            except BlockingIOError:
                pass
            try:
                piece = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") if chunked else chunk
                s.settimeout(2)
                s.sendall(piece)
                s.setblocking(False)
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                break
        s.settimeout(10)
        try:
            while b"\r\n\r\n" not in answer:
                more = s.recv(65536)
                if not more:
                    break
                answer += more
        except (ConnectionResetError, socket.timeout):
            pass
    return int(answer.split(b" ", 2)[1]), sent


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
