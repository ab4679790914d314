"""The retry policy and the private-address refusal that the volumes and upload stages share
(their end-to-end behaviour is in test_volumes.py and test_uploads.py).

The refusal tests use no DNS and send nothing off the machine: a resolver in the test answers
for made-up names, and a network double (:class:`Net`) carries "public" addresses to servers on
127.0.0.1 (the internet, as far as the test is concerned), lets loopback through for real (so a
check that failed would reach the private server, which counts its requests), and refuses to
open anything else."""

from __future__ import annotations

import functools
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

import httpcore
import httpx
import pytest
from pydantic import TypeAdapter

from cluster.errors import PrivateAddress, TransferStopped, UploadError, UsageError, VolumeError
from cluster.miner import uploads, volumes
from cluster.miner.fetch import Retry, Stage, http_client
from cluster.protocol.job_io import Upload, Volume


class Boom(Exception):
    pass


def stage(**kw) -> Stage:
    return Stage(**{"retries": 2, "backoff_s": 0, "timeout_s": 5, "deadline_s": None, "cancel": None, **kw})


def run(st: Stage, outcomes: list):
    """Retry over ``outcomes`` (a value, a Retry, or an exception to raise); return (result, tries)."""
    tries = []

    def attempt():
        out = outcomes[len(tries)]
        tries.append(out)
        if isinstance(out, BaseException):
            raise out
        return out

    result = st.retry(attempt, before=lambda: None, refused=lambda exc: Boom(f"refused: {exc}"),
                      exhausted=lambda n, last: Boom(f"{n} tries ({last})"))
    return result, len(tries)


def test_retries_until_a_result():
    assert run(stage(), [Retry("HTTP 503"), httpx.ConnectError("refused"), 7]) == (7, 3)


def test_gives_up_after_the_retries_naming_the_last_cause():
    with pytest.raises(Boom, match=r"^3 tries \(HTTP 502\)$"):
        run(stage(), [Retry("HTTP 503"), httpx.ReadTimeout("slow"), Retry("HTTP 502"), 7])
    with pytest.raises(Boom, match=r"^1 tries \(ConnectError\)$"):  # an exception without text: its type
        run(stage(retries=0), [httpx.ConnectError(""), 7])


def test_a_private_address_is_not_retried():
    with pytest.raises(Boom, match="^refused: nope$") as info:
        run(stage(), [PrivateAddress("nope"), 7])
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_other_errors_pass_through_at_once():
    with pytest.raises(ValueError):
        run(stage(), [ValueError("bad"), 7])


def test_a_failure_elsewhere_stops_a_waiting_retry_and_the_next_step():
    st = stage(backoff_s=30)
    threading.Timer(0.2, st.stop.set).start()
    with pytest.raises(TransferStopped):
        run(st, [Retry("HTTP 503"), 7])
    with pytest.raises(TransferStopped):
        st.halted()


def test_cancel_and_deadline_halt_the_stage():
    now = [100.0]
    cancel = threading.Event()
    st = stage(deadline_s=10, cancel=cancel, clock=lambda: now[0])
    assert st.halted() is None and st.timeout() == 5
    now[0] = 107.5
    assert st.timeout() == 2.5  # the per-operation timeout shrinks as the deadline nears
    now[0] = 111
    assert st.halted() == "timeout" and st.timeout() == 0.001
    cancel.set()
    assert st.halted() == "cancelled"


def test_private_addresses_refused_unless_allowed():
    assert issubclass(PrivateAddress, UsageError)
    with http_client(allow_private_networks=False, timeout_s=2, follow_redirects=True) as client:
        with pytest.raises(PrivateAddress) as info:  # the query (a presigned URL's signature) is not shown
            client.get("http://127.0.0.1:9/x?X-Amz-Signature=secret")
    assert str(info.value) == ("http://127.0.0.1:9/x?... resolves to 127.0.0.1, which is not a public address; "
                               "miners fetch and send only to public hosts, so use a URL on one")
    with http_client(allow_private_networks=True, timeout_s=2, follow_redirects=True) as client:
        assert client.event_hooks["request"] == [] and client.headers["User-Agent"] == "rayhorde-miner"


# ---------------------------------------------------------------------- pinned connections
PUBLIC = "93.184.215.14"  # a global address; the test's network carries it to a local server
PUBLIC6 = "2606:4700::1111"


class Resolver:
    """Answers for made-up names: each question gets the next answer for its name (the last one
    repeats); an unknown name is not found. ``asked`` records the questions."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        turns = self.answers[host]
        return turns[min(self.asked.count(host), len(turns)) - 1]


class _Stream(httpcore.NetworkStream):
    """A connection that goes nowhere: it records the TLS server name asked for, then fails."""

    def __init__(self, net: "Net") -> None:
        self.net = net

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        self.net.tls.append((server_hostname, ssl_context.check_hostname, ssl_context.verify_mode))
        raise httpcore.ConnectError("the test's network ends here")

    def close(self) -> None:
        pass


class Net(httpcore.NetworkBackend):
    """The test's network: ``routes`` maps a public address to a local port (None: a dead end
    that records TLS); loopback is real; anything else is refused. ``connects`` records targets."""

    def __init__(self, routes: dict[str, int | None] | None = None) -> None:
        self.routes = routes or {}
        self.connects: list[tuple[str, int]] = []
        self.tls: list[tuple] = []
        self.real = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout=None, local_address=None, socket_options=None):
        self.connects.append((host, port))
        if host in self.routes:
            if self.routes[host] is None:
                return _Stream(self)
            return self.real.connect_tcp("127.0.0.1", self.routes[host], timeout, local_address, socket_options)
        if host in ("127.0.0.1", "::1"):
            return self.real.connect_tcp(host, port, timeout, local_address, socket_options)
        raise AssertionError(f"the test tried to connect to {host}:{port}")


class Site:
    """An HTTP server on 127.0.0.1: records (method, path, Host) of each request and answers
    ``reply(method, path) -> (status, headers, body)``."""

    def __init__(self, reply: Callable[[str, str], tuple[int, dict[str, str], bytes]]) -> None:
        self.reply = reply
        self.seen: list[tuple[str, str, str]] = []
        self.port = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        site = self.server.site
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        site.seen.append((self.command, self.path, self.headers.get("Host", "")))
        code, headers, body = site.reply(self.command, self.path)
        self.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., Site]]:
    """``serve(reply)``: a :class:`Site` on 127.0.0.1 for the test."""
    servers = []

    def start(reply=lambda method, path: (200, {}, b"private")) -> Site:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.site = Site(reply)
        server.site.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server.site

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


def pinned(resolve: Resolver, net: Net, *, follow_redirects: bool = True) -> httpx.Client:
    return http_client(allow_private_networks=False, timeout_s=5, follow_redirects=follow_redirects,
                       resolve=resolve, network=net)


@pytest.mark.integration
def test_a_rebinding_name_is_refused_on_its_second_answer(serve):
    """The name answers a public address, then 127.0.0.1: the first transfer goes to the public
    address it checked (Host header unchanged), the next is refused, and the miner's own
    service on 127.0.0.1 never hears from either."""
    private = serve()
    public = serve(lambda method, path: (200, {}, b"public"))
    resolve = Resolver({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
    net = Net({PUBLIC: public.port})
    url = f"http://rebind.test:{private.port}/secret?X-Amz-Signature=s3cr3t"
    with pinned(resolve, net) as client:
        assert client.get(url).content == b"public"
    assert public.seen == [("GET", "/secret?X-Amz-Signature=s3cr3t", f"rebind.test:{private.port}")]
    with pinned(resolve, net) as client, pytest.raises(PrivateAddress) as info:
        client.get(url)
    assert str(info.value).startswith(f"http://rebind.test:{private.port}/secret?... resolves to 127.0.0.1, "
                                      "which is not a public address")
    assert resolve.asked == ["rebind.test", "rebind.test"]  # once per connection, never again to connect
    assert net.connects == [(PUBLIC, private.port)] and private.seen == []


def test_the_connection_goes_to_the_checked_address_and_tls_checks_the_name():
    resolve = Resolver({"files.example": [[PUBLIC6]]})
    net = Net({PUBLIC6: None, PUBLIC: None})
    with pinned(resolve, net) as client:
        with pytest.raises(httpx.ConnectError, match="the test's network ends here"):
            client.get("https://files.example/model.bin")
        with pytest.raises(httpx.ConnectError):  # an IP literal is checked as it is, never resolved
            client.get(f"https://{PUBLIC}:8443/x")
    assert resolve.asked == ["files.example"]
    assert net.connects == [(PUBLIC6, 443), (PUBLIC, 8443)]
    assert net.tls[0] == ("files.example", True, ssl.CERT_REQUIRED)  # the certificate must name the host


@pytest.mark.parametrize("answer", [["127.0.0.1"], ["169.254.169.254"], ["::1"], ["fe80::1%2"], ["10.0.0.7"],
                                    ["::ffff:127.0.0.1"], [PUBLIC, "127.0.0.1"]])
def test_a_name_with_any_private_answer_is_refused_before_connecting(answer):
    resolve = Resolver({"inside.test": [answer]})
    net = Net({PUBLIC: None})
    with pinned(resolve, net) as client, pytest.raises(PrivateAddress, match=r"^http://inside\.test:9/ resolves to "
                                                       + answer[-1].replace(".", r"\.") + ", which is not"):
        client.put("http://inside.test:9/", content=b"x")
    assert net.connects == []


@pytest.mark.parametrize("url", ["http://[::1]:9/", "http://[::ffff:127.0.0.1]:9/", "http://127.1:9/",
                                 "http://2130706433:9/", "http://169.254.169.254/latest/meta-data/"])
def test_literal_and_numeric_hosts_are_checked(url):
    """Spellings of loopback and link-local refused by the default resolver (numeric: no DNS asked)."""
    with http_client(allow_private_networks=False, timeout_s=2, follow_redirects=True) as client:
        with pytest.raises(PrivateAddress, match="which is not a public address"):
            client.get(url)


def test_an_unresolvable_name_is_a_connection_error():
    with pinned(Resolver({}), Net()) as client, pytest.raises(httpx.ConnectError, match="cannot resolve nowhere.test"):
        client.get("http://nowhere.test/")


@pytest.mark.integration
@pytest.mark.parametrize("address", ["127.0.0.1", "169.254.169.254"])
def test_a_redirect_to_a_private_name_is_refused(serve, address):
    private = serve()
    target = f"http://internal.test:{private.port}/secret?X-Amz-Signature=s3cr3t"
    public = serve(lambda method, path: (302, {"Location": target}, b""))
    resolve = Resolver({"files.example": [[PUBLIC]], "internal.test": [[address]]})
    net = Net({PUBLIC: public.port})
    with pinned(resolve, net) as client, pytest.raises(PrivateAddress) as info:
        client.get(f"http://files.example:{public.port}/model.bin")
    assert str(info.value).startswith(f"http://internal.test:{private.port}/secret?... resolves to {address}, ")
    assert [p for _, p, _ in public.seen] == ["/model.bin"] and private.seen == []
    assert net.connects == [(PUBLIC, public.port)]


def _503_then_close(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    return 503, {"Connection": "close"}, b"busy"  # the retry needs a new connection: a new resolution


@pytest.mark.integration
def test_a_download_refuses_a_rebinding_name(serve, tmp_path, monkeypatch):
    private = serve()
    public = serve(_503_then_close)
    resolve = Resolver({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
    net = Net({PUBLIC: public.port})
    monkeypatch.setattr(volumes, "http_client", functools.partial(http_client, resolve=resolve, network=net))
    spec = TypeAdapter(list[Volume]).validate_python(
        [{"type": "http_file", "path": "f", "url": f"http://rebind.test:{private.port}/f"}])
    limits = volumes.VolumeLimits(max_download_bytes=1000, max_unpacked_bytes=1000, max_files=10, retries=3,
                                  backoff_s=0.01, timeout_s=5)
    assert limits.allow_private_networks is False
    with pytest.raises(VolumeError) as info:
        volumes.prepare_volumes(spec, tmp_path / "volume", limits=limits)
    assert info.value.reason == "download_failed"
    assert f"rebind.test:{private.port}/f resolves to 127.0.0.1, which is not a public address" in info.value.message
    assert len(public.seen) == 1 and private.seen == [] and net.connects == [(PUBLIC, private.port)]
    assert not (tmp_path / "volume").exists()


@pytest.mark.integration
def test_an_upload_refuses_a_rebinding_name(serve, tmp_path, monkeypatch):
    private = serve()
    public = serve(_503_then_close)
    resolve = Resolver({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
    net = Net({PUBLIC: public.port})
    monkeypatch.setattr(uploads, "http_client", functools.partial(http_client, resolve=resolve, network=net))
    output = tmp_path / "output"
    output.mkdir()
    (output / "result.json").write_text("{}")
    spec = TypeAdapter(list[Upload]).validate_python(
        [{"type": "put", "path": "result.json", "url": f"http://rebind.test:{private.port}/r?X-Amz-Signature=s"}])
    with pytest.raises(UploadError) as info:
        uploads.upload_outputs(spec, output, retries=3, backoff_s=0.01, timeout_s=5)
    assert info.value.reason == "upload_failed"
    message = info.value.message
    assert f"rebind.test:{private.port}/r?... resolves to 127.0.0.1, which is not a public address" in message
    assert [m for m, _, _ in public.seen] == ["PUT"] and private.seen == [] and net.connects == [(PUBLIC, private.port)]
