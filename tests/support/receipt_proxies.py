"""Miners' proxies for the receipt-collection tests, on 127.0.0.1: an honest one (the echo app
behind a real :class:`MinerProxy`, answers made through it by a signed client) and hostile ones
in front of it, each breaking the receipts protocol or the collector's budget one way."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
from starlette.applications import Starlette
from starlette.routing import Route

from cluster.miner.proxy import JobRoute, MinerProxy
from cluster.miner.serving import BackgroundServer
from cluster.protocol.envelope import seal
from cluster.protocol.identity import Hotkey
from cluster.protocol.keys import PublicKey
from cluster.protocol.streams import READY_KIND, StreamReady
from cluster.verification.collector import StreamSource
from serve_apps import RequestSigner, SigningKey
from serve_apps.echo import EchoApp
from tests.support.net import free_port

GB = 2**30


class HonestMiner:
    """One miner serving one echo job through its real proxy, ``answers`` answers made."""

    def __init__(self, uri: str, job_id: str, *, validator: str, answers: int = 5) -> None:
        self.hotkey = Hotkey.from_uri(uri)
        self.job_id, self.prefix = job_id, f"/jobs/{job_id}"
        self.client = SigningKey()
        echo = EchoApp(job_id, self.hotkey.ss58, [self.client.public.model_dump()], route_prefix=self.prefix)

        async def endpoint(request):
            return await echo(request)

        self._job = _serve(Starlette(routes=[Route(self.prefix + "/{rest:path}", endpoint, methods=["GET", "POST"])]),
                           f"echo job {job_id}")
        job_url = f"http://127.0.0.1:{self._job.server.config.port}"
        self.job_key = PublicKey.model_validate(httpx.get(f"{job_url}{self.prefix}/-/key").json()["job_key"])
        self.proxy = MinerProxy(self.hotkey, validator_hotkey=validator)
        self.proxy.add_job(JobRoute(job_id=job_id, upstream=job_url, client_keys=[self.client.public],
                                    job_key=self.job_key))
        self._front = _serve(self.proxy.app, f"proxy of {uri}")
        self.url = f"http://127.0.0.1:{self._front.server.config.port}"
        with httpx.Client(base_url=self.url, auth=RequestSigner(self.client, job_id), timeout=10) as c:
            for i in range(answers):
                assert c.post(f"{self.prefix}/echo", content=b'{"i": %d}' % i).status_code == 200

    def source(self, proxy_url: str | None = None) -> StreamSource:
        return StreamSource(job_id=self.job_id, miner_hotkey=self.hotkey.ss58, proxy_url=proxy_url or self.url,
                            job_key=self.job_key, client_keys=[self.client.public], route_prefix=self.prefix,
                            weights_sha256=None)

    def readiness(self, proxy_url: str | None = None) -> str:
        """The miner-signed readiness naming ``proxy_url`` (default: its honest proxy), as stored."""
        return seal(self.hotkey, READY_KIND, StreamReady(job_id=self.job_id, job_key=self.job_key,
                                                         proxy_url=proxy_url or self.url)).model_dump_json()

    def stop(self) -> None:
        self._front.stop()
        self._job.stop()


def _serve(app, name: str) -> BackgroundServer:
    server = BackgroundServer(app, name=name, host="127.0.0.1", port=free_port())
    server.start()
    return server


class HostileProxy:
    """A miner's proxy gone bad, in front of ``upstream`` (an honest proxy's URL, which it asks
    with the validator's own envelope). ``mode``:

    list      the honest page's ``receipts`` list, without the object around it
    stuck     the first page it got, whatever ``after_seq`` is asked: seq never advances
    reused    honest pages, but from the second on the request ids are the first page's
    twice     two records of one page with one request id
    long      one record more than asked
    huge      a 200 with no Content-Length and a body of ``GB`` bytes, made as it is sent
    announced the same, with ``Content-Length: GB``
    slow      headers at once, then one body byte every ``interval_s``
    slow_headers  the status line and headers, one byte every ``interval_s``

    ``sent`` counts the body bytes that went out; ``pulls`` the requests it answered; ``closed``
    is set once an answer ended (the collector hung up, or it was all sent). ``tls`` (a
    certificate and its key) makes it serve HTTPS."""

    def __init__(self, mode: str, upstream: str = "", *, interval_s: float = 29.0,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.mode, self.upstream, self.interval_s = mode, upstream, interval_s
        self.sent = 0
        self.pulls = 0
        self.first: dict | None = None  # the first honest page it got
        self.closing = threading.Event()
        self.closed = threading.Event()
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                hostile.pulls += 1
                try:
                    hostile._answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the collector hung up: what this test wants
                finally:
                    hostile.closed.set()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"http{'s' if tls else ''}://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"hostile {mode}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ answers
    def _honest(self, h: BaseHTTPRequestHandler) -> dict:
        page = httpx.get(self.upstream + h.path, headers={"Authorization": h.headers["Authorization"]},
                         timeout=10).raise_for_status().json()
        if self.first is None:
            self.first = page
        return page

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        mode = self.mode
        if mode in ("huge", "announced", "slow", "slow_headers"):
            return self._stream(h)
        first_pull = self.first is None
        page = self.first if mode == "stuck" and not first_pull else self._honest(h)
        page = json.loads(json.dumps(page))  # a copy to mangle
        records = page["receipts"]
        if mode == "list":
            page = records
        elif mode == "reused" and not first_pull:
            for record, old in zip(records, self.first["receipts"]):
                record["receipt"]["body"]["request_id"] = old["receipt"]["body"]["request_id"]
        elif mode == "twice":
            records[1]["receipt"]["body"]["request_id"] = records[0]["receipt"]["body"]["request_id"]
        elif mode == "long":
            limit = int(parse_qs(urlsplit(h.path).query)["limit"][0])
            records.extend(records[-1:] * (limit + 1 - len(records)))
        body = json.dumps(page).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        self.sent += len(body)

    def _stream(self, h: BaseHTTPRequestHandler) -> None:
        framing = b"Content-Length: %d" % GB if self.mode == "announced" else b"Transfer-Encoding: chunked"
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%s\r\n\r\n" % framing
        if self.mode != "slow_headers":
            h.wfile.write(head)
        else:
            for byte in head:
                h.wfile.write(bytes([byte]))
                if self.closing.wait(self.interval_s):
                    return
        start = b'{"job_id": "x", "receipts": ['
        self._chunk(h, start)
        if self.mode in ("huge", "announced"):
            block = b"[" * 2**20  # never valid, never ends before 1 GB
            while self.sent < GB and not self.closing.is_set():
                self._chunk(h, block)
            return
        while not self.closing.wait(self.interval_s):  # slow: one byte at a time
            self._chunk(h, b" ")

    def _chunk(self, h: BaseHTTPRequestHandler, data: bytes) -> None:
        data = data[:GB - self.sent]
        h.wfile.write(data if self.mode == "announced" else b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.flush()
        self.sent += len(data)
