"""Long polls: a reader waits for a job or stream to change without asking the database in a loop.

Every write that a waiting reader may care about (a final status, a new ticket, a stream ready
or ended) calls :meth:`Changes.notify` after its transaction commits; readers re-read the
database when woken, and at least once a second anyway, which also covers a notify that came
between their read and their wait.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")
MAX_WAIT_S = 30  # the longest a client may hold a request open


class Changes:
    def __init__(self) -> None:
        self._changed = threading.Condition()

    def notify(self) -> None:
        """Wake every waiting reader (call it after the transaction committed)."""
        with self._changed:
            self._changed.notify_all()

    def poll(self, read: Callable[[], T], done: Callable[[T], bool], wait_s: float) -> T:
        """``read()`` until ``done`` says so, or ``wait_s`` (at most :data:`MAX_WAIT_S`) passed."""
        deadline = time.monotonic() + min(wait_s, MAX_WAIT_S)
        while True:
            value = read()
            remaining = deadline - time.monotonic()
            if done(value) or remaining <= 0:
                return value
            with self._changed:
                self._changed.wait(min(remaining, 1.0))  # the 1 s cap also covers a missed notify
