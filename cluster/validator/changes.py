"""Long polls: a reader waits for a job or stream to change without asking the database in a loop.

Every write that a waiting reader may care about (a final status, a new ticket, a stream ready
or ended) calls :meth:`Changes.notify` after its transaction commits; readers re-read the
database when woken, and at least once a second anyway, which also covers a notify that came
between their read and their wait.

HTTP long-polls wait with :meth:`Changes.apoll`: on the server's event loop, holding no thread
(each read borrows one for its query only), so no number of them can starve the threads other
requests need. :meth:`Changes.poll` is the same wait for a caller that has a thread to spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from typing import Callable, TypeVar

import anyio.to_thread

from cluster.protocol.jobs import MAX_WAIT_S

T = TypeVar("T")


def _deadline(wait_s: float) -> float:
    if not math.isfinite(wait_s) or wait_s < 0:  # the doors answer 422 first; never wait forever here
        raise ValueError(f"wait_s={wait_s}: must be finite and at least 0")
    return time.monotonic() + min(wait_s, MAX_WAIT_S)


class Changes:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def notify(self) -> None:
        """Wake every waiting reader (call it after the transaction committed)."""
        with self._changed:
            self._changed.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits there any more
                loop.call_soon_threadsafe(event.set)

    def poll(self, read: Callable[[], T], done: Callable[[T], bool], wait_s: float) -> T:
        """``read()`` until ``done`` says so, or ``wait_s`` (at most :data:`MAX_WAIT_S`) passed."""
        deadline = _deadline(wait_s)
        while True:
            value = read()
            remaining = deadline - time.monotonic()
            if done(value) or remaining <= 0:
                return value
            with self._changed:
                self._changed.wait(min(remaining, 1.0))  # the 1 s cap also covers a missed notify

    async def apoll(self, read: Callable[[], T], done: Callable[[T], bool], wait_s: float) -> T:
        """:meth:`poll` on the event loop: ``read`` runs in a worker thread, the wait holds none."""
        deadline = _deadline(wait_s)
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._changed:
            self._waiters.add(waiter)  # before the first read: a notify after it is not missed
        try:
            while True:
                waiter[1].clear()
                value = await anyio.to_thread.run_sync(read)
                remaining = deadline - time.monotonic()
                if done(value) or remaining <= 0:
                    return value
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(waiter[1].wait(), min(remaining, 1.0))
        finally:
            with self._changed:
                self._waiters.discard(waiter)
