"""The miner proxy: the only public door to a miner's streaming jobs (each node's Serve proxy
binds to loopback), and where every answer gets its receipt.

For every request it checks the client envelope (its own nonce store: a replay is refused here
before it costs the job anything), forwards the exact bytes to the job's route on the local
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
(``Authorization: Rayhorde <validator-signed receipts_pull envelope>``).
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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cluster.protocol.envelope import SignedEnvelope, open_envelope
from cluster.protocol.http import error_body
from cluster.protocol.identity import Hotkey
from cluster.protocol.messages import ReceiptsPull
from cluster.errors import Refused
from cluster.protocol.client_envelope import REQUEST_HEADER, SIGNATURE_HEADER, MemoryNonces, check_request
from cluster.protocol.job_side import JOB_RECEIPT_HEADER, SSE_JOB_PREFIX, parse_job_half
from cluster.protocol.keys import PublicKey
from cluster.protocol.receipts import RECEIPT_HEADER, SSE_PREFIX, Receipt, miner_countersign
from cluster.protocol.streams import FILE_NAME_PATTERN

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
    receipts: dict[str, dict] = field(default_factory=dict)  # request_id -> receipt + bodies
    ended: str | None = None  # why the job ended (open streams stop, new requests are refused)


class MinerProxy:
    def __init__(self, miner: Hotkey, *, max_skew_s: float = 5, idle_timeout_s: float = 10,
                 validator_hotkey: str | None = None, volumes_dir: Path | None = None,
                 volume_max_bytes: int = 64 * 2**20) -> None:
        self.miner = miner
        self.max_skew_s = max_skew_s
        self.idle_timeout_s = idle_timeout_s
        self.validator_hotkey = validator_hotkey
        self.volumes_dir = volumes_dir
        self.volume_max_bytes = volume_max_bytes
        self.jobs: dict[str, JobRoute] = {}
        self.nonces = MemoryNonces(keep_s=4 * max_skew_s + 60)
        self._session: aiohttp.ClientSession | None = None  # made in the server's event loop
        self.app = Starlette(routes=[
            Route("/jobs/{job_id}/receipts", self.receipts_page, methods=["GET"]),
            Route("/jobs/{job_id}/receipts/{request_id}", self.receipt, methods=["GET"]),
            Route("/jobs/{job_id}/volume/{name}", self.put_file, methods=["PUT"]),
            Route("/jobs/{job_id}/{rest:path}", self.forward, methods=["GET", "POST"]),
        ], lifespan=self._lifespan)

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
            size = int(request.headers.get("content-length") or 0)
            if size > self.volume_max_bytes:
                raise Refused("file_too_large", f"{size} bytes; this miner takes files up to "
                              f"{self.volume_max_bytes} bytes", status_code=413)
            body = await request.body()
            if len(body) > self.volume_max_bytes:
                raise Refused("file_too_large", f"{len(body)} bytes; this miner takes files up to "
                              f"{self.volume_max_bytes} bytes", status_code=413)
            check_request(request.headers, body, method="PUT", path=request.url.path, job_id=job.job_id,
                          client_keys=job.client_keys, nonces=self.nonces, max_skew_s=self.max_skew_s)
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
        job = self.jobs.get(request.path_params["job_id"])
        if job is None or pull.job_id != job.job_id:
            return _error("not_found", "no such job on this miner, or the envelope names another", 404)
        kept = sorted(job.receipts.values(), key=lambda k: k["receipt"]["body"]["seq"])
        page = [k for k in kept if k["receipt"]["body"]["seq"] > pull.after_seq][:pull.limit]
        b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
        return JSONResponse({"job_id": job.job_id, "receipts": [
            {"receipt": k["receipt"], "request_b64": b64(k["request"]), "response_b64": b64(k["response"]),
             "envelope_b64": b64(k["envelope"]), "client_sig": k["client_sig"]} for k in page]})

    async def receipt(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job_id"])
        kept = job.receipts.get(request.path_params["request_id"]) if job else None
        if kept is None:
            return _error("not_found", "no such receipt", 404)
        return JSONResponse(kept["receipt"])

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            job = self._job(request.path_params["job_id"])
            env = check_request(request.headers, body, method=request.method, path=path, job_id=job.job_id,
                                client_keys=job.client_keys, nonces=self.nonces, max_skew_s=self.max_skew_s)
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
            self._keep(job, env.request_id, receipt, body, out, request.headers)
            return Response(out, resp.status, media_type=ctype or None, headers={RECEIPT_HEADER: receipt.to_b64()})
        return StreamingResponse(self._stream(job, resp, env.request_id, body, request.headers),
                                 media_type="text/event-stream")

    async def _stream(self, job: JobRoute, resp: aiohttp.ClientResponse, request_id: str, body: bytes, headers):
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
                        yield _error_event("job_ended", f"the streaming job ended: {job.ended}")
                        return
                    if idle >= self.idle_timeout_s and not nxt.done():
                        log.warning("stream %s idle for %.1f s: closing it", request_id, self.idle_timeout_s)
                        yield _error_event("idle_timeout", f"the job sent nothing for {self.idle_timeout_s:g} s "
                                           "(idle timeout)")
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
                        self._keep(job, request_id, receipt, body, bytes(sent), headers)
                        yield SSE_PREFIX + receipt.to_b64().encode() + b"\n\n"
                        return
                    sent += event
                    yield event
            yield _error_event("no_receipt", "the job ended the stream without a receipt")
        except asyncio.TimeoutError:  # aiohttp's own read timeout (sock_read = the idle timeout)
            yield _error_event("idle_timeout", f"the job sent nothing for {self.idle_timeout_s:g} s (idle timeout)")
        except (aiohttp.ClientError, ValueError) as exc:
            yield _error_event("job_unreachable", f"the stream from the job failed: {exc!r}")
        finally:
            if nxt is not None and not nxt.done():
                nxt.cancel()
            resp.release()

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

    def _keep(self, job: JobRoute, request_id: str, receipt: Receipt, body: bytes, out: bytes, headers) -> None:
        """Everything a validator needs to check the answer without trusting this miner: the
        client-signed envelope (its sha256 is the request id and the sampling key), both bodies
        and the receipt."""
        job.receipts[request_id] = {"receipt": receipt.model_dump(mode="json"), "request": body, "response": out,
                                    "envelope": base64.b64decode(headers[REQUEST_HEADER]),
                                    "client_sig": headers[SIGNATURE_HEADER]}


def _error(reason: str, message: str, status: int) -> JSONResponse:
    return JSONResponse(error_body(reason, message), status)


def _error_event(reason: str, message: str) -> bytes:
    """Ends a broken stream: a comment for people, then an error event the ``openai`` client raises
    on (it reads ``data: {"error": {"message", ...}}`` as an API error). No receipt follows."""
    return f": error {message}\n\ndata: {json.dumps(error_body(reason, message, type=reason))}\n\n".encode()
