"""What the volumes and upload stages share when they talk HTTP for a job: the refusal of
private addresses, and retries with backoff under the stage's deadline and cancellation.

* where: a URL (or a redirect) whose host resolves to a loopback, private or link-local address
  is refused unless ``allow_private_networks`` is set, so a job cannot make the miner fetch from
  or send to its own services (the agent, the Ray dashboard, a cloud metadata endpoint);
* retries: a try that ends in a connection error or an answer in :data:`RETRY_STATUSES` is tried
  again after ``backoff_s``, doubling each time, at most ``retries`` times; anything else (a
  4xx, a cap passed, a private address) fails at once, since it will not get better;
* one stage, one fate: the transfers of a stage run in parallel, and the first one that fails
  stops the others (:class:`TransferStopped`, never reported: the first failure is).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Callable, Literal, NamedTuple, TypeVar

import httpx

from cluster.errors import PrivateAddress, TransferStopped
from cluster.protocol.job_io import redact_url

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK = 1 << 16
T = TypeVar("T")


def refuse_private_addresses(request: httpx.Request) -> None:
    """httpx request hook (runs for redirects too): refuse non-global destinations.

    A hostname is resolved here and again when connecting, so DNS rebinding can still slip
    through; a firewall on the miner is the complete answer, this catches the plain case."""
    host = request.url.host
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, request.url.port or 80, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return  # the connection attempt will fail with a clear error of its own
    bad = sorted(a for a in addrs if not ipaddress.ip_address(a.split("%")[0]).is_global)
    if bad:
        raise PrivateAddress(f"{redact_url(str(request.url))} resolves to {bad[0]}, which is not a public address; "
                             "miners fetch and send only to public hosts")


def http_client(*, allow_private_networks: bool, timeout_s: float, follow_redirects: bool,
                headers: dict[str, str] | None = None) -> httpx.Client:
    """An httpx client for a job's transfers; it refuses private addresses unless allowed."""
    hooks = {} if allow_private_networks else {"request": [refuse_private_addresses]}
    return httpx.Client(follow_redirects=follow_redirects, timeout=timeout_s, event_hooks=hooks,
                        headers={"User-Agent": "rayhorde-miner", **(headers or {})})


class Retry(NamedTuple):
    """What a try returns when trying again may succeed; ``why`` ends up in the final message."""

    why: str


class Stage:
    """The deadline, cancellation and retry policy shared by the parallel transfers of one stage.

    ``stop`` is set by the first transfer that fails; the others end at their next step."""

    def __init__(self, *, retries: int, backoff_s: float, timeout_s: float, deadline_s: float | None,
                 cancel: threading.Event | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.deadline = None if deadline_s is None else clock() + deadline_s
        self.cancel, self.clock = cancel, clock
        self.stop = threading.Event()

    def halted(self) -> Literal["cancelled", "timeout"] | None:
        """Why the stage must end now (the caller raises its own error), or None to go on.
        Raises :class:`TransferStopped` once another transfer of the stage has failed."""
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.deadline is not None and self.clock() > self.deadline:
            return "timeout"
        if self.stop.is_set():
            raise TransferStopped("stopped because another transfer of the stage failed")
        return None

    def timeout(self) -> float:
        """The timeout for one network operation: ``timeout_s``, or less as the deadline nears."""
        if self.deadline is None:
            return self.timeout_s
        return max(0.001, min(self.timeout_s, self.deadline - self.clock()))

    def retry(self, attempt: Callable[[], T | Retry], *, before: Callable[[], None],
              refused: Callable[[PrivateAddress], Exception], exhausted: Callable[[int, str], Exception]) -> T:
        """Call ``attempt`` until it returns something other than a :class:`Retry`.

        A :class:`Retry` or an ``httpx.TransportError`` is a failed try; ``before`` runs before
        each try (to raise when the stage is halted). Raises ``refused(exc)`` at once for a
        private address, ``exhausted(tries, last reason)`` after the last retry, and
        :class:`TransferStopped` when the stage stops during a backoff."""
        failures = 0
        while True:
            before()
            try:
                outcome = attempt()
            except httpx.TransportError as exc:
                outcome = Retry(str(exc) or type(exc).__name__)
            except PrivateAddress as exc:
                raise refused(exc) from None
            if not isinstance(outcome, Retry):
                return outcome
            failures += 1
            if failures > self.retries:
                raise exhausted(failures, outcome.why)
            if self.stop.wait(self.backoff_s * 2 ** (failures - 1)):
                raise TransferStopped("stopped during a retry because another transfer of the stage failed")
