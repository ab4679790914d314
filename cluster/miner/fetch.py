"""What the volumes and upload stages share when they talk HTTP for a job: the refusal of
private addresses, and retries with backoff under the stage's deadline and cancellation.

* where: a URL (or a redirect) whose host resolves to a loopback, private or link-local address
  is refused unless ``allow_private_networks`` is set, so a job cannot make the miner fetch from
  or send to its own services (the agent, the Ray dashboard, a cloud metadata endpoint). The
  check sits under the connection (:class:`PinnedTransport`): each new connection resolves its
  host once, refuses it if any answer is not a public address, and connects to the address it
  checked, never to the name. A name that answers a public address and then ``127.0.0.1`` (DNS
  rebinding) gets no second say over where a checked connection goes, and is refused when it is
  asked again (a retry, a redirect). The Host header, TLS server name and certificate check stay
  the URL's host. A proxy would resolve the name itself, so these clients use none (no
  ``HTTP(S)_PROXY``);
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
from typing import Any, Callable, Iterable, Literal, NamedTuple, Sequence, TypeVar

import httpcore
import httpx

from cluster.errors import PrivateAddress, TransferStopped
from cluster.protocol.job_io import redact_url

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK = 1 << 16
T = TypeVar("T")


Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> addresses``: how a connection finds the addresses of a host name."""


def resolve_host(host: str, port: int) -> list[str]:
    """The system resolver's addresses for ``host``, in its order (what a connection by name would try)."""
    return list(dict.fromkeys(str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


def is_public(address: str) -> bool:
    """Whether a job may reach ``address``: a global unicast address (an IPv4-mapped IPv6 address
    is judged by its IPv4 address, which is where it connects)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


class PinnedBackend(httpcore.NetworkBackend):
    """An httpcore network backend that resolves a host once, refuses it unless every address is
    public, and opens the connection to an address it checked.

    An IP literal is checked as it is. A name that cannot be resolved is a connection error (a
    retry may succeed). ``network`` opens the sockets (default: httpcore's own; tests route
    addresses with it)."""

    def __init__(self, resolve: Resolver, network: httpcore.NetworkBackend | None = None) -> None:
        self.resolve = resolve
        self.network = network or httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        try:
            ipaddress.ip_address(host.split("%")[0])
            addresses = [host]
        except ValueError:
            try:
                addresses = list(self.resolve(host, port))
            except (OSError, UnicodeError) as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve {host}: no address")
        for address in addresses:
            if not is_public(address):
                raise PrivateAddress(address)  # just the address: PinnedTransport names the URL
        failure: Exception | None = None
        for address in addresses:  # like a connection by name: the first address that answers
            try:
                return self.network.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("a job's transfer never uses a unix socket")

    def sleep(self, seconds: float) -> None:
        self.network.sleep(seconds)


class PinnedTransport(httpx.HTTPTransport):
    """httpx's transport over a :class:`PinnedBackend`: every request (each redirect is one)
    that needs a new connection has its host checked and pinned; the connection pool is keyed
    by the URL's host, so a kept-alive connection is one that was checked.

    Raises :class:`PrivateAddress` naming the URL (redacted) and the address."""

    def __init__(self, *, resolve: Resolver = resolve_host, network: httpcore.NetworkBackend | None = None) -> None:
        ssl_context = httpx.create_ssl_context()
        super().__init__(verify=ssl_context)
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's defaults
        self._pool = httpcore.ConnectionPool(  # the one change to httpx's own pool: the network backend
            ssl_context=ssl_context, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=PinnedBackend(resolve, network))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except PrivateAddress as exc:
            raise PrivateAddress(f"{redact_url(str(request.url))} resolves to {exc.args[0]}, which is not a public "
                                 "address; miners fetch and send only to public hosts, so use a URL on one") from None


def http_client(*, allow_private_networks: bool, timeout_s: float, follow_redirects: bool,
                headers: dict[str, str] | None = None, resolve: Resolver = resolve_host,
                network: httpcore.NetworkBackend | None = None) -> httpx.Client:
    """An httpx client for a job's transfers; it refuses private addresses unless allowed
    (:class:`PinnedTransport`, with ``resolve`` and ``network``); when allowed, a plain client."""
    transport = None if allow_private_networks else PinnedTransport(resolve=resolve, network=network)
    return httpx.Client(follow_redirects=follow_redirects, timeout=timeout_s, transport=transport,
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
