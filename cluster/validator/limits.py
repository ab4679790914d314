"""What bounds the load one client can put on validator-core, and what it knows of its own
serving.

    BodyLimit   ASGI middleware: a body over its path's limit is refused with 413 before more than
                the limit is read (a ``Content-Length`` over it before anything is read; a chunked
                body as soon as the running count passes it).
    RateLimit   a token bucket per client address for the endpoints anyone may call (429 with
                ``Retry-After``); it forgets idle addresses, so it is bounded too.
    PollSlots   how many long-polls one capability may hold open at once (429 beyond): long-polls
                are async and hold no thread, this keeps one user from holding all the sockets.
    Uptime      since when validator-core has been serving without a stall: a miner's silence
                counts against it only while validator-core was there to hear it
                (:meth:`~cluster.validator.placement.Placement.is_lost`). Restart and stalls of the
                heartbeat path (``stall_s`` without a tick) start a new serving period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.errors import BodyTooLarge, Refused
from cluster.protocol.http import error_body
from cluster.protocol.identity import Clock


class BodyLimit:
    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str], int]) -> None:
        """``limit_for(path)``: the most body bytes a request to ``path`` may send."""
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _too_large(send, BodyTooLarge(limit, f"Content-Length {length.decode(errors='replace')[:32]}"))
            return
        seen = 0
        started = answered = False

        async def counted_receive() -> Message:
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exc = BodyTooLarge(limit, f"more than {limit} bytes sent")
                    if not started and not answered:  # answer now: the app may turn the error into its own
                        answered = True
                        await _too_large(send, exc)
                    raise exc
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # the 413 went out already
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not answered:
                raise  # the app's answer was on its way: the server closes the connection


async def _too_large(send: Send, exc: BodyTooLarge) -> None:
    body = json.dumps(error_body("body_too_large", str(exc))).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RateLimit:
    """``rate_per_s`` requests per second per key, bursts up to ``burst``."""

    def __init__(self, rate_per_s: float, burst: int, *, max_keys: int = 65536,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self.monotonic = monotonic
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str, what: str) -> None:
        """Spend one token of ``key``, or raise a 429 :class:`Refused` saying when to retry."""
        now = self.monotonic()
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                wait_s = (1 - tokens) / self.rate_per_s
                raise Refused("rate_limited", f"{what}: at most {self.rate_per_s:g} per second per address "
                              f"(bursts of {self.burst}); retry in {wait_s:.1f} s", status_code=429,
                              retry_after_s=wait_s)
            self._buckets[key] = (tokens - 1, now)
            while len(self._buckets) > self.max_keys:  # the least recently seen go first
                self._buckets.popitem(last=False)


class PollSlots:
    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            if self._held.get(key, 0) >= self.per_key:
                raise Refused("too_many_polls", f"this capability already holds {self.per_key} long-polls open; "
                              "wait for one to return (or poll with wait_s=0)", status_code=429, retry_after_s=1)
            self._held[key] = self._held.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._held.pop(key) - 1
                if left:
                    self._held[key] = left


class Uptime:
    """Since when validator-core has been serving heartbeats without a stall (``clock`` ns).

    ``since_ns`` starts at construction (a restart starts a new period); :meth:`tick` runs every
    ``tick_s`` on the path heartbeats take, and a tick later than ``stall_s`` starts a new period."""

    def __init__(self, clock: Clock, *, stall_s: float = 2.0, tick_s: float = 0.25,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.stall_s = stall_s
        self.tick_s = tick_s
        self.monotonic = monotonic
        self.since_ns = clock()
        self.stalls = 0
        self._last = monotonic()

    def tick(self) -> None:
        now = self.monotonic()
        if now - self._last > self.stall_s:
            self.since_ns = self.clock()
            self.stalls += 1
        self._last = now

    async def run(self, on_path: Callable[[], Awaitable[Any]]) -> None:
        """Tick until cancelled; each tick first passes through ``on_path`` (the heartbeat pool)."""
        while True:
            await on_path()
            self.tick()
            await asyncio.sleep(self.tick_s)
