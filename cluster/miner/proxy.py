"""The miner proxy: the only public door to a miner's streaming jobs (each node's Serve proxy
binds to loopback), and where every answer gets its receipt.

For every request it checks the client envelope from the headers before it reads the body (an
unsigned or replayed request is refused having cost no read; its own nonce store refuses a replay
before it costs the job anything), reads the body only up to its limit (413 beyond), forwards the exact bytes to the job's route on the local
Serve proxy (loopback), checks that the job's half of the receipt binds the bytes it is about
to return, counter-signs with the miner hotkey and attaches the receipt: a header for buffered
answers, a final ``: receipt <base64>`` SSE comment line for streamed ones. Receipts and both
bodies are kept by request id. Each stream has its own idle timeout (Serve's request timeout
is cluster-wide), so a dead job ends a stream with an error instead of a hang; when the agent
ends a job (terminated, time limit, its Ray node died) its open streams end within
``_POLL_S`` with an error event the ``openai`` client raises on (``data: {"error": ...}``).

Other doors, all checked with the same client envelope: ``PUT /jobs/<id>/volume/<name>`` puts a
file into the job's volume (the client never reaches the job's node directly), and
``GET /jobs/<id>/receipts?after_seq=N&limit=M`` gives validators pages of receipts and bodies
(``Authorization: Rayhorde <validator-signed receipts_pull envelope>``) out of the
:class:`~cluster.miner.receipt_book.ReceiptBook`: on disk beside the agent, so a restart loses
none, and a streamed answer is read to its end even when its client left first (the ``openai``
client closes at ``data: [DONE]``), so its receipt is kept too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cluster.protocol.envelope import SignedEnvelope, open_envelope
from cluster.protocol.http import error_body, framework_error_body
from cluster.protocol.identity import Hotkey
from cluster.protocol.messages import ReceiptsPull
from cluster.errors import Refused
from cluster.protocol.client_envelope import (
    REQUEST_HEADER, SIGNATURE_HEADER, MemoryNonces, check_body, check_request,
)
from cluster.protocol.job_side import JOB_RECEIPT_HEADER, SSE_JOB_PREFIX, parse_job_half
from cluster.protocol.keys import PublicKey
from cluster.protocol.receipts import RECEIPT_HEADER, SSE_PREFIX, Receipt, miner_countersign
from cluster.protocol.streams import FILE_NAME_PATTERN
from cluster.miner.receipt_book import ReceiptBook

log = logging.getLogger("rayhorde.proxy")
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "accept-encoding"}
_POLL_S = 0.25  # how often an open stream looks whether its job was ended
_FILE_NAME = re.compile(FILE_NAME_PATTERN)


@dataclass
class JobRoute:
    job_id: str
    upstream: str  # e.g. http://127.0.0.1:<serve port>: the job's route lives at /jobs/<job_id>
    client_keys: list[PublicKey]
    job_key: PublicKey
    ended: str | None = None  # why the job ended (open streams stop, new requests are refused)


class MinerProxy:
    def __init__(self, miner: Hotkey, *, max_skew_s: float = 5, idle_timeout_s: float = 10,
                 validator_hotkey: str | None = None, volumes_dir: Path | None = None,
                 volume_max_bytes: int = 64 * 2**20, request_max_bytes: int = 2**20,
                 book: ReceiptBook | None = None) -> None:
        """``book``: where answers are kept until the validator pulled them (default: in memory,
        lost with the process; the agent keeps them on disk)."""
        self.miner = miner
        self.book = book or ReceiptBook(":memory:")
        self.request_max_bytes = request_max_bytes
        self.max_skew_s = max_skew_s
        self.idle_timeout_s = idle_timeout_s
        self.validator_hotkey = validator_hotkey
        self.volumes_dir = volumes_dir
        self.volume_max_bytes = volume_max_bytes
        self.jobs: dict[str, JobRoute] = {}
        self.nonces = MemoryNonces(keep_s=4 * max_skew_s + 60)
        self._session: aiohttp.ClientSession | None = None  # made in the server's event loop
        self._pumps: set[asyncio.Future] = set()  # streams read to their end, client or not
        self.app = Starlette(routes=[
            Route("/jobs/{job_id}/receipts", self.receipts_page, methods=["GET"]),
            Route("/jobs/{job_id}/receipts/{request_id}", self.receipt, methods=["GET"]),
            Route("/jobs/{job_id}/volume/{name}", self.put_file, methods=["PUT"]),
            Route("/jobs/{job_id}/{rest:path}", self.forward, methods=["GET", "POST"]),
        ], lifespan=self._lifespan, exception_handlers={HTTPException: _framework_error})
        self.app.router.redirect_slashes = False  # a path this door does not serve is a 404, never a redirect

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app):
        yield
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # aiohttp: the forward is the proxy's hot path, and it costs less CPU per request than httpx
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(sock_connect=5, sock_read=self.idle_timeout_s),
                connector=aiohttp.TCPConnector(limit=256), auto_decompress=False)
        return self._session

    def add_job(self, route: JobRoute) -> None:
        self.jobs[route.job_id] = route

    def end_job(self, job_id: str, reason: str) -> None:
        """The job is over (terminated, time limit, node lost): refuse new requests, end open
        streams with an error. Its receipts stay available to validators."""
        job = self.jobs.get(job_id)
        if job is not None and job.ended is None:
            job.ended = reason

    def end_all(self, reason: str) -> None:
        for job_id in list(self.jobs):
            self.end_job(job_id, reason)

    def _job(self, job_id: str) -> JobRoute:
        job = self.jobs.get(job_id)
        if job is None:
            raise Refused("unknown_job", f"no streaming job {job_id} on this miner", status_code=404)
        if job.ended is not None:
            raise Refused("job_ended", f"streaming job {job_id} has ended: {job.ended}", status_code=410)
        return job

    async def put_file(self, request: Request) -> Response:
        """A file for the job's volume, sent through the miner (signed like any request)."""
        name = request.path_params["name"]
        try:
            job = self._job(request.path_params["job_id"])
            if self.volumes_dir is None:
                raise Refused("no_volume", "this proxy keeps no volumes for streaming jobs", status_code=404)
            if not _FILE_NAME.match(name):
                raise Refused("bad_file_name", f"file name {name[:80]!r} must match {_FILE_NAME.pattern}",
                              status_code=400)
            _length_within(request, self.volume_max_bytes, "file_too_large", "files")
            env = check_request(request.headers, None, method="PUT", path=request.url.path, job_id=job.job_id,
                                client_keys=job.client_keys, nonces=self.nonces, max_skew_s=self.max_skew_s)
            body = await _read_within(request, self.volume_max_bytes, "file_too_large", "files")
            check_body(env, body)
        except Refused as exc:
            return _error(exc.reason, exc.message, exc.status_code or 403)
        folder = self.volumes_dir / job.job_id
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.part"
        tmp.write_bytes(body)
        os.chmod(tmp, 0o644)
        tmp.replace(folder / name)  # the job never sees half a file
        return JSONResponse({"name": name, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()})

    async def receipts_page(self, request: Request) -> Response:
        """Receipts and both bodies in ``seq`` order, for the validator this miner joined."""
        auth = request.headers.get("authorization", "")
        try:
            if self.validator_hotkey is None:
                raise Refused("no_validator", "this proxy serves receipt pages to no validator", status_code=403)
            if not auth.startswith("Rayhorde "):
                raise Refused("unsigned", "send Authorization: Rayhorde <receipts_pull envelope signed by the "
                              "validator>", status_code=401)
            env = SignedEnvelope.from_token(auth[len("Rayhorde "):].strip())
            pull = ReceiptsPull.model_validate(open_envelope(env, kind="receipts_pull", max_skew_s=self.max_skew_s,
                                                             signers=[self.validator_hotkey], guard=self.nonces))
        except Refused as exc:
            return _error(exc.reason, exc.message, exc.status_code or 403)
        except ValueError as exc:
            return _error("malformed", f"not a receipts_pull envelope: {exc}", 400)
        job_id = request.path_params["job_id"]
        if pull.job_id != job_id or (job_id not in self.jobs and self.book.count(job_id) == 0):
            return _error("not_found", "no such job on this miner, or the envelope names another", 404)
        page = await asyncio.to_thread(self.book.page, job_id, after_seq=pull.after_seq, limit=pull.limit)
        b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
        return JSONResponse({"job_id": job_id, "receipts": [
            {"receipt": k["receipt"], "request_b64": b64(k["request"]), "response_b64": b64(k["response"]),
             "envelope_b64": b64(k["envelope"]), "client_sig": k["client_sig"]} for k in page]})

    async def receipt(self, request: Request) -> Response:
        kept = await asyncio.to_thread(self.book.receipt, request.path_params["job_id"],
                                       request.path_params["request_id"])
        if kept is None:
            return _error("not_found", "no such receipt", 404)
        return JSONResponse(kept)

    async def forward(self, request: Request) -> Response:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:  # the signature before the body: an unsigned request costs this miner no read
            job = self._job(request.path_params["job_id"])
            if request.path_params["rest"].startswith("-/"):  # the app's own routes (its key): the agent's, not a client's
                raise Refused("not_found", f"{request.url.path[:200]} is not served through the miner proxy",
                              status_code=404)
            _length_within(request, self.request_max_bytes, "body_too_large", "request bodies")
            env = check_request(request.headers, None, method=request.method, path=path, job_id=job.job_id,
                                client_keys=job.client_keys, nonces=self.nonces, max_skew_s=self.max_skew_s)
            body = await _read_within(request, self.request_max_bytes, "body_too_large", "request bodies")
            check_body(env, body)
        except Refused as exc:
            return _error(exc.reason, exc.message, exc.status_code or 403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            resp = await self._http().request(request.method, job.upstream + path, data=body, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return _error("job_unreachable", f"the job did not answer: {exc!r}", 502)
        ctype = resp.headers.get("Content-Type", "")
        if resp.status >= 400 or "text/event-stream" not in ctype:
            try:
                out = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return _error("job_unreachable", f"the job's answer broke off: {exc!r}", 502)
            finally:
                resp.release()
            if resp.status >= 400:
                return Response(out, resp.status, media_type=ctype or None)
            try:
                receipt = self._countersign(job, resp.headers[JOB_RECEIPT_HEADER], env.request_id, out)
            except (KeyError, ValueError) as exc:
                return _error("receipt_failed", f"the job's receipt does not bind its answer: {exc}", 502)
            await self._keep(job, env.request_id, receipt, body, out, request.headers)
            return Response(out, resp.status, media_type=ctype or None, headers={RECEIPT_HEADER: receipt.to_b64()})
        return StreamingResponse(self._stream(job, resp, env.request_id, body, request.headers),
                                 media_type="text/event-stream")

    async def _stream(self, job: JobRoute, resp: aiohttp.ClientResponse, request_id: str, body: bytes, headers):
        """The client's side of a streamed answer. The upstream is read by a task of its own to its
        end, so a client that goes away early (the ``openai`` client closes at ``data: [DONE]``,
        before the receipt event) still leaves its answer's receipt kept: no chain gap for an
        honest miner."""
        out: asyncio.Queue[bytes | None] = asyncio.Queue()  # bounded by the answer's own size
        pump = asyncio.ensure_future(self._relay(job, resp, request_id, body, headers, out.put_nowait))
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        while (event := await out.get()) is not None:
            yield event

    async def _relay(self, job: JobRoute, resp: aiohttp.ClientResponse, request_id: str, body: bytes, headers,
                     emit) -> None:
        """Read the job's stream to its end, handing each whole event to ``emit`` (then None)."""
        sent = bytearray()
        buf = b""
        chunks = resp.content.iter_any()
        nxt: asyncio.Task | None = None
        try:
            while True:
                nxt = nxt or asyncio.ensure_future(chunks.__anext__())
                idle = 0.0
                while not nxt.done():  # wait for the next chunk, looking at the job's state meanwhile
                    await asyncio.wait({nxt}, timeout=_POLL_S)
                    idle += _POLL_S
                    if job.ended is not None and not nxt.done():
                        emit(_error_event("job_ended", f"the streaming job ended: {job.ended}"))
                        return
                    if idle >= self.idle_timeout_s and not nxt.done():
                        log.warning("stream %s idle for %.1f s: closing it", request_id, self.idle_timeout_s)
                        emit(_error_event("idle_timeout", f"the job sent nothing for {self.idle_timeout_s:g} s "
                                          "(idle timeout)"))
                        return
                try:
                    chunk = nxt.result()
                except StopAsyncIteration:
                    break
                nxt = None
                buf += chunk
                while b"\n\n" in buf:  # whole SSE events only, so the trailer is never split
                    event, buf = buf.split(b"\n\n", 1)
                    event += b"\n\n"
                    if event.startswith(SSE_JOB_PREFIX):
                        receipt = self._countersign(job, event[len(SSE_JOB_PREFIX):].strip(), request_id,
                                                    bytes(sent))
                        await self._keep(job, request_id, receipt, body, bytes(sent), headers)
                        emit(SSE_PREFIX + receipt.to_b64().encode() + b"\n\n")
                        return
                    sent += event
                    emit(event)
            emit(_error_event("no_receipt", "the job ended the stream without a receipt"))
        except asyncio.TimeoutError:  # aiohttp's own read timeout (sock_read = the idle timeout)
            emit(_error_event("idle_timeout", f"the job sent nothing for {self.idle_timeout_s:g} s (idle timeout)"))
        except (aiohttp.ClientError, ValueError) as exc:
            emit(_error_event("job_unreachable", f"the stream from the job failed: {exc!r}"))
        finally:
            if nxt is not None and not nxt.done():
                nxt.cancel()
            resp.release()
            emit(None)

    def _countersign(self, job: JobRoute, half_b64, request_id: str, out: bytes) -> Receipt:
        body, job_sig = parse_job_half(half_b64)
        if (body.request_id != request_id or body.job_id != job.job_id or body.job_key != job.job_key
                or body.miner_hotkey != self.miner.ss58):
            raise ValueError("receipt names another request, job, key or miner")
        if body.output_sha256 != hashlib.sha256(out).hexdigest():
            raise ValueError("output hash differs from the bytes returned")
        if not job.job_key.verify(body.canonical(), job_sig):
            raise ValueError("job signature does not verify")
        return miner_countersign(self.miner, body, job_sig)

    async def _keep(self, job: JobRoute, request_id: str, receipt: Receipt, body: bytes, out: bytes,
                    headers) -> None:
        """Everything a validator needs to check the answer without trusting this miner, in the
        book on disk: the client-signed envelope (its sha256 is the request id and the sampling
        key), both bodies and the receipt."""
        await asyncio.to_thread(self.book.keep, job.job_id, request_id, receipt=receipt.model_dump(mode="json"),
                                request=body, response=out, envelope=base64.b64decode(headers[REQUEST_HEADER]),
                                client_sig=headers[SIGNATURE_HEADER])


def _length_within(request: Request, limit: int, reason: str, what: str) -> None:
    """Refuse (413) a declared ``Content-Length`` over ``limit`` before anything is read."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise Refused(reason, f"Content-Length {length[:32]}; this miner takes {what} up to {limit} bytes",
                      status_code=413)


async def _read_within(request: Request, limit: int, reason: str, what: str) -> bytes:
    """The body, read only while it stays within ``limit`` (a chunked body may declare no length)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refused(reason, f"more than {limit} bytes sent; this miner takes {what} up to {limit} bytes",
                          status_code=413)
    return bytes(body)


async def _framework_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own answers (no such route, a method a route does not take) in the one shape."""
    allow = (exc.headers or {}).get("Allow")
    return JSONResponse(framework_error_body(exc.status_code, exc.detail, method=request.method,
                                             path=request.url.path, allow=allow),
                        exc.status_code, headers={"Allow": allow} if allow else None)


def _error(reason: str, message: str, status: int) -> JSONResponse:
    return JSONResponse(error_body(reason, message), status)


def _error_event(reason: str, message: str) -> bytes:
    """Ends a broken stream: a comment for people, then an error event the ``openai`` client raises
    on (it reads ``data: {"error": {"message", ...}}`` as an API error). No receipt follows."""
    return f": error {message}\n\ndata: {json.dumps(error_body(reason, message, type=reason))}\n\n".encode()
