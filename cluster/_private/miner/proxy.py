"""The miner proxy: the only public door to a miner's streaming jobs (DESIGN §1 point 5, §2).

For every request it checks the client envelope (its own nonce store: a replay is refused here
before it costs the job anything), forwards the exact bytes to the job's route on the local
Serve proxy (loopback), checks that the job's half of the receipt binds the bytes it is about
to return, counter-signs with the miner hotkey and attaches the receipt: a header for buffered
answers, a final ``: receipt <base64>`` SSE comment line for streamed ones. Receipts and both
bodies are kept by request id. Each stream has its own idle timeout (Serve's request timeout
is cluster-wide), so a dead job ends a stream with an error instead of a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass, field

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cluster._private.identity import Hotkey
from cluster.errors import Refused
from serve_apps._private.client_envelope import MemoryNonces, check_request
from serve_apps._private.job_side import JOB_RECEIPT_HEADER, SSE_JOB_PREFIX, parse_job_half
from serve_apps._private.keys import PublicKey
from serve_apps._private.receipts import RECEIPT_HEADER, SSE_PREFIX, Receipt, miner_countersign

log = logging.getLogger("rayhorde.proxy")
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "accept-encoding"}


@dataclass
class JobRoute:
    job_id: str
    upstream: str  # e.g. http://127.0.0.1:<serve port>: the job's route lives at /jobs/<job_id>
    client_keys: list[PublicKey]
    job_key: PublicKey
    receipts: dict[str, dict] = field(default_factory=dict)  # request_id -> receipt + bodies


class MinerProxy:
    def __init__(self, miner: Hotkey, *, max_skew_s: float = 5, idle_timeout_s: float = 10) -> None:
        self.miner = miner
        self.max_skew_s = max_skew_s
        self.idle_timeout_s = idle_timeout_s
        self.jobs: dict[str, JobRoute] = {}
        self.nonces = MemoryNonces(keep_s=4 * max_skew_s + 60)
        self._session: aiohttp.ClientSession | None = None  # made in the server's event loop
        self.app = Starlette(routes=[
            Route("/jobs/{job_id}/receipts/{request_id}", self.receipt, methods=["GET"]),
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

    async def receipt(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job_id"])
        kept = job.receipts.get(request.path_params["request_id"]) if job else None
        if kept is None:
            return _error("not_found", "no such receipt", 404)
        return JSONResponse(kept["receipt"])

    async def forward(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job_id"])
        if job is None:
            return _error("unknown_job", f"no streaming job {request.path_params['job_id']} on this miner", 404)
        body = await request.body()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
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
            self._keep(job, env.request_id, receipt, body, out)
            return Response(out, resp.status, media_type=ctype or None, headers={RECEIPT_HEADER: receipt.to_b64()})
        return StreamingResponse(self._stream(job, resp, env.request_id, body), media_type="text/event-stream")

    async def _stream(self, job: JobRoute, resp: aiohttp.ClientResponse, request_id: str, body: bytes):
        sent = bytearray()
        buf = b""
        chunks = resp.content.iter_any()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), timeout=self.idle_timeout_s)
                except StopAsyncIteration:
                    break
                buf += chunk
                while b"\n\n" in buf:  # whole SSE events only, so the trailer is never split
                    event, buf = buf.split(b"\n\n", 1)
                    event += b"\n\n"
                    if event.startswith(SSE_JOB_PREFIX):
                        receipt = self._countersign(job, event[len(SSE_JOB_PREFIX):].strip(), request_id,
                                                    bytes(sent))
                        self._keep(job, request_id, receipt, body, bytes(sent))
                        yield SSE_PREFIX + receipt.to_b64().encode() + b"\n\n"
                        return
                    sent += event
                    yield event
            yield b": error the job ended the stream without a receipt\n\n"
        except asyncio.TimeoutError:
            log.warning("stream %s idle for %.1f s: closing it", request_id, self.idle_timeout_s)
            yield f": error the job sent nothing for {self.idle_timeout_s:g} s (idle timeout)\n\n".encode()
        except (aiohttp.ClientError, ValueError) as exc:
            yield f": error the stream from the job failed: {exc!r}\n\n".encode()
        finally:
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

    def _keep(self, job: JobRoute, request_id: str, receipt: Receipt, body: bytes, out: bytes) -> None:
        job.receipts[request_id] = {"receipt": receipt.model_dump(mode="json"), "request": body, "response": out}


def _error(reason: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": {"reason": reason, "message": message}}, status)


def main(argv: list[str] | None = None) -> None:
    """Run a proxy for fixed jobs: ``python -m cluster._private.miner.proxy --port P --miner-uri //Bob
    --job '{"job_id": ..., "upstream": ..., "client_keys": [...], "job_key": {...}}'`` (benchmarks;
    the agent will run it in-process for the jobs validator-core places on it)."""
    import argparse
    import json

    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--miner-uri", required=True)
    ap.add_argument("--job", action="append", default=[])
    ap.add_argument("--idle-timeout-s", type=float, default=10)
    args = ap.parse_args(argv)
    proxy = MinerProxy(Hotkey.from_uri(args.miner_uri), idle_timeout_s=args.idle_timeout_s)
    for raw in args.job:
        spec = json.loads(raw)
        proxy.add_job(JobRoute(job_id=spec["job_id"], upstream=spec["upstream"],
                               client_keys=[PublicKey.model_validate(k) for k in spec["client_keys"]],
                               job_key=PublicKey.model_validate(spec["job_key"])))
    uvicorn.run(proxy.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
