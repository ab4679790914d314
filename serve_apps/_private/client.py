"""The streaming client: deploy a whitelisted app, wait until it is ready, call it (plain
``httpx`` or the official ``openai`` client), verify every receipt, terminate.

    streams = Streams(validator_url, capability)
    job = streams.deploy(StreamSpec(app="echo", version="1", client_keys=[key.public]))
    job.wait_ready()                      # checks the miner-signed readiness once
    answer = job.call("/echo", b"hi")     # Answer(content, receipt): already verified
    llm = job.openai(key)                 # openai.OpenAI(..., http_client=<signing, verifying>)
    job.terminate()

Every request is signed by :class:`RequestSigner`; every answer passes through
:class:`VerifyingTransport`, which recomputes both hashes from the bytes sent and received,
checks both signatures against the readiness message, the chain (``seq`` / ``prev_sha256``)
when it holds the previous receipt, and the clock bounds. A failure raises
:class:`ReceiptInvalid` naming the check; with ``openai`` a buffered answer's failure arrives as
its ``APIConnectionError`` cause (the transport raises), a streamed one while iterating.

TLS: validator-core and the proxies are verified against ``ca_bundle`` (default
``$RAYHORDE_CA_BUNDLE``, else the default CAs); a certificate that bundle does not vouch for raises
:class:`CertificateUntrusted`, from the ``openai`` client too.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx

from cluster.protocol.envelope import SignedEnvelope, open_envelope
from cluster.protocol.http import ServiceClient, raise_for_error, tls_verify, untrusted_certificate
from cluster.errors import ReceiptInvalid, Refused, StreamFailed
from cluster.protocol.jobs import JobStatus
from cluster.protocol.client_envelope import RequestSigner
from cluster.protocol.keys import SigningKey
from cluster.protocol.streams import READY_KIND, StreamReady, StreamSpec, StreamView
from cluster.protocol.receipts import RECEIPT_HEADER, Receipt, ReceiptBody, split_sse, verify_receipt


_DONE = b"data: [DONE]"


@dataclass
class Answer:
    status_code: int
    content: bytes  # for SSE: every byte before the receipt line
    receipt: ReceiptBody | None  # None only for error answers (they carry no receipt)


class ReceiptLog:
    """The receipts one client verified for one job, by ``seq``: a receipt whose predecessor is
    held must chain onto it (concurrent calls may arrive out of order; validators check whole
    chains from the miner's pages)."""

    def __init__(self) -> None:
        self.by_seq: dict[int, ReceiptBody] = {}
        self._lock = threading.Lock()

    def previous(self, seq: int) -> ReceiptBody | None:
        with self._lock:
            return self.by_seq.get(seq - 1)

    def add(self, body: ReceiptBody) -> None:
        with self._lock:
            nxt = self.by_seq.get(body.seq + 1)
            if nxt is not None and nxt.prev_sha256 != body.digest():
                raise ReceiptInvalid("chain", f"receipt seq {body.seq} is not the one receipt seq {nxt.seq} names")
            if body.seq in self.by_seq and self.by_seq[body.seq] != body:
                raise ReceiptInvalid("chain", f"two different receipts with seq {body.seq} (a fork)")
            self.by_seq[body.seq] = body


class VerifyingTransport(httpx.BaseTransport):
    """Wraps a transport: every 2xx answer must carry a receipt that verifies."""

    def __init__(self, ready: StreamReady, miner_hotkey: str, *, max_skew_s: float = 5,
                 inner: httpx.BaseTransport | None = None, log: ReceiptLog | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.ready, self.miner_hotkey, self.max_skew_s = ready, miner_hotkey, max_skew_s
        self.inner = inner or httpx.HTTPTransport(verify=tls_verify())
        self.log = log or ReceiptLog()
        self.clock = clock

    def verify(self, receipt: Receipt, sent: bytes, received: bytes, t_sent: int, t_received: int) -> ReceiptBody:
        body = verify_receipt(receipt, job_id=self.ready.job_id, job_key=self.ready.job_key,
                              miner_hotkey=self.miner_hotkey, sent_body=sent, received_body=received,
                              client_sent_ns=t_sent, client_received_ns=t_received, max_skew_s=self.max_skew_s,
                              prev=self.log.previous(receipt.body.seq))
        self.log.add(body)
        return body

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = request.read()
        t_sent = self.clock()
        try:
            resp = self.inner.handle_request(request)
        except httpx.ConnectError as exc:  # name an untrusted certificate (openai would only say "Connection error")
            untrusted = untrusted_certificate(exc, f"{request.url.scheme}://{request.url.netloc.decode()}")
            if untrusted is None:
                raise
            raise untrusted from exc
        if resp.status_code >= 300:
            return resp
        if "text/event-stream" not in resp.headers.get("content-type", ""):
            content = resp.read()
            t_received = self.clock()
            receipt = resp.headers.get(RECEIPT_HEADER)
            if receipt is None:
                raise ReceiptInvalid("missing", f"the answer has no {RECEIPT_HEADER} header")
            body = self.verify(Receipt.from_b64(receipt), sent, content, t_sent, t_received)
            resp.extensions["rayhorde_receipt"] = body
            return httpx.Response(resp.status_code, headers=resp.headers, content=content,
                                  extensions=resp.extensions, request=request)
        stream = _VerifiedStream(self, resp, sent, t_sent)
        return httpx.Response(resp.status_code, headers=resp.headers, request=request, stream=stream,
                              extensions={**resp.extensions, "rayhorde_stream": stream})

    def close(self) -> None:
        self.inner.close()


class _VerifiedStream(httpx.SyncByteStream):
    """Passes SSE bytes through as they come; at the end, checks the receipt line."""

    def __init__(self, transport: VerifyingTransport, resp: httpx.Response, sent: bytes, t_sent: int) -> None:
        self.t, self.resp, self.sent, self.t_sent = transport, resp, sent, t_sent
        self.body: ReceiptBody | None = None

    def __iter__(self) -> Iterator[bytes]:
        # The openai client stops reading at "data: [DONE]" and closes the response, so the
        # receipt line after it would never be read: once [DONE] arrives, read to the end and
        # verify BEFORE handing [DONE] on (a bad receipt raises while the caller iterates).
        got = bytearray()
        raw = iter(self.resp.stream)  # raw bytes (a tampering test transport hands back a read response)
        for chunk in raw:
            start = len(got)
            got += chunk
            if _DONE not in got[max(0, start - len(_DONE)):]:
                yield chunk
                continue
            for rest in raw:
                got += rest
            self._verify(got)
            yield bytes(got[start:])
            return
        self._verify(got)

    def _verify(self, got: bytearray) -> None:
        t_received = self.t.clock()
        content, receipt = split_sse(bytes(got))  # ReceiptInvalid("missing") when the stream broke off
        self.body = self.t.verify(receipt, self.sent, content, self.t_sent, t_received)

    def close(self) -> None:
        self.resp.close()


class StreamJob:
    """One streaming job: its view, readiness, clients and calls."""

    def __init__(self, streams: "Streams", view: StreamView) -> None:
        self.streams = streams
        self.view = view
        self.job_id = view.job_id
        self.ready: StreamReady | None = None
        self.log = ReceiptLog()

    def refresh(self, wait_s: float = 0) -> StreamView:
        self.view = StreamView.model_validate(self.streams.api.get(f"/v1/streams/{self.job_id}",
                                                                   params={"wait_s": wait_s}))
        return self.view

    def wait_ready(self, timeout_s: float = 300) -> StreamReady:
        """Wait until the miner announced the job; check the announcement (signed by the miner
        validator-core placed the job on, for this job). Raises :class:`StreamFailed`."""
        deadline = time.monotonic() + timeout_s
        while self.view.status == JobStatus.accepted and time.monotonic() < deadline:
            self.refresh(wait_s=min(10.0, max(0.0, deadline - time.monotonic())))
        if self.view.status != JobStatus.streaming_ready:
            why = self.view.failure.message if self.view.failure else f"status {self.view.status.value}"
            raise StreamFailed(f"streaming job {self.job_id} is not ready: {why}", self.view)
        env = SignedEnvelope.model_validate(self.view.readiness)
        payload = open_envelope(env, kind=READY_KIND, max_skew_s=0, signers=[self.view.miner_hotkey],
                                check_time=False)
        ready = StreamReady.model_validate(payload)
        if ready.job_id != self.job_id:
            raise Refused("wrong_job", f"readiness is for job {ready.job_id}, not {self.job_id}")
        self.ready = ready
        return ready

    @property
    def base_url(self) -> str:
        if self.ready is None:
            self.wait_ready()
        assert self.ready is not None
        return self.ready.proxy_url.rstrip("/") + self.view.route_prefix

    def http(self, key: SigningKey, *, timeout_s: float = 120, inner: httpx.BaseTransport | None = None) -> httpx.Client:
        """An ``httpx.Client`` on the job's route that signs every request and verifies every answer."""
        base = self.base_url
        assert self.ready is not None and self.view.miner_hotkey is not None
        transport = VerifyingTransport(self.ready, self.view.miner_hotkey, max_skew_s=self.streams.max_skew_s,
                                       inner=inner or httpx.HTTPTransport(verify=self.streams.tls), log=self.log)
        return httpx.Client(base_url=base, auth=RequestSigner(key, self.job_id), transport=transport,
                            timeout=timeout_s)

    def openai(self, key: SigningKey, **kwargs):
        """The official ``openai`` client on this job (``/v1`` under the job's route)."""
        import openai

        kwargs.setdefault("max_retries", 0)  # a retry is a new signed request; let callers decide
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", http_client=self.http(key), **kwargs)

    def call(self, key: SigningKey, path: str, body: bytes = b"", *, method: str = "POST",
             client: httpx.Client | None = None) -> Answer:
        """One request; the answer's receipt is verified (``ReceiptInvalid`` otherwise)."""
        own = client is None
        c = client or self.http(key)
        try:
            with c.stream(method, path, content=body) as resp:
                raw = resp.read()
                if resp.status_code >= 300:
                    return Answer(resp.status_code, raw, None)
                stream = resp.extensions.get("rayhorde_stream")
                if stream is not None:  # verified when the last byte was read
                    content, _ = split_sse(raw)
                    return Answer(resp.status_code, content, stream.body)
                return Answer(resp.status_code, raw, resp.extensions.get("rayhorde_receipt"))
        finally:
            if own:
                c.close()

    def put_file(self, key: SigningKey, name: str, data: bytes) -> dict:
        """Send a file into the job's volume, through the miner's proxy."""
        with httpx.Client(base_url=self.base_url, auth=RequestSigner(key, self.job_id), timeout=120,
                          verify=self.streams.tls) as c:
            try:
                resp = c.put(f"/volume/{name}", content=data)
            except httpx.ConnectError as exc:
                untrusted = untrusted_certificate(exc, self.base_url)
                if untrusted is None:
                    raise
                raise untrusted from exc
        raise_for_error(resp)  # the proxy's refusal, as its rayhorde error
        return resp.json()

    def terminate(self) -> StreamView:
        self.view = StreamView.model_validate(self.streams.api.post(f"/v1/streams/{self.job_id}/terminate"))
        return self.view


class Streams:
    """A user's door to validator-core's streaming jobs (capability as bearer token); ``ca_bundle``
    verifies validator-core and the miners' proxies (default ``$RAYHORDE_CA_BUNDLE``)."""

    def __init__(self, validator_url: str, capability: str, *, max_skew_s: float = 5,
                 ca_bundle: str | Path | None = None) -> None:
        self.tls: ssl.SSLContext | bool = tls_verify(ca_bundle)
        self.api = ServiceClient(validator_url, timeout_s=60, headers={"Authorization": f"Bearer {capability}"},
                                 verify=ca_bundle)
        self.max_skew_s = max_skew_s

    def deploy(self, spec: StreamSpec) -> StreamJob:
        return StreamJob(self, StreamView.model_validate(self.api.post("/v1/streams", spec.model_dump(mode="json"))))

    def get(self, job_id: str) -> StreamJob:
        return StreamJob(self, StreamView.model_validate(self.api.get(f"/v1/streams/{job_id}")))

    def list(self) -> list[StreamView]:
        return [StreamView.model_validate(v) for v in self.api.get("/v1/streams")]

    def close(self) -> None:
        self.api.close()
