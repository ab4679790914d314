"""The echo app: the smallest whitelisted streaming app, for fast tests and the proxy benchmark.

``POST <prefix>/echo`` answers ``{"echo": <body>}``; with ``?stream=1`` it answers the body back
as server-sent events, one event per 64 bytes, then ``data: [DONE]``. ``GET <prefix>/-/key``
gives the job key (the agent signs it into the readiness message). ``POST <prefix>/volume``
with ``{"name": ...}`` answers ``{"name", "content"}`` of a file the client put into the job's
volume through the miner proxy (``PUT /jobs/<id>/volume/<name>``). Every answer carries the
job's half of the receipt; errors are rayhorde's one error shape (``{"error": {"reason",
"message"}}``, no receipt). It is a plain ASGI-callable class, so Ray Serve can deploy it
(``serve.deployment(EchoApp)``) and tests can run it under uvicorn.
"""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cluster.errors import Refused
from cluster.protocol.http import error_body
from cluster.protocol.job_side import JOB_RECEIPT_HEADER, SSE_JOB_PREFIX, JobSide
from cluster.protocol.keys import PublicKey


class EchoApp:
    def __init__(self, job_id: str, miner_hotkey: str, client_keys: list[dict], *, route_prefix: str = "",
                 max_skew_s: float = 5, chunk_delay_s: float = 0.0) -> None:
        self.side = JobSide(job_id, miner_hotkey, [PublicKey.model_validate(k) for k in client_keys],
                            max_skew_s=max_skew_s)
        self.prefix = route_prefix.rstrip("/")
        self.chunk_delay_s = chunk_delay_s

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        local = path[len(self.prefix):] if path.startswith(self.prefix) else path
        if request.method == "GET" and local == "/-/key":
            return JSONResponse({"job_id": self.side.job_id, "job_key": self.side.key.public.model_dump()})
        if request.method != "POST" or local not in ("/echo", "/volume"):
            return JSONResponse(error_body("not_found", f"no route {request.method} {local}"), 404)
        body = await request.body()
        t_from = self.side.clock()
        full = path + (f"?{request.url.query}" if request.url.query else "")
        try:
            env = self.side.check(request.headers, body, method="POST", path=full)
        except Refused as exc:
            return JSONResponse(error_body(exc.reason, exc.message), exc.status_code or 403)
        if local == "/volume":
            try:
                out = self._read_volume(body)
            except Refused as exc:
                return JSONResponse(error_body(exc.reason, exc.message), exc.status_code or 400)
            return Response(out, media_type="application/json",
                            headers={JOB_RECEIPT_HEADER: self.side.sign(env, t_from=t_from, output=out)})
        if request.query_params.get("stream") != "1":
            out = b'{"echo":' + json.dumps(body.decode("utf-8", "replace")).encode() + b"}"
            return Response(out, media_type="application/json",
                            headers={JOB_RECEIPT_HEADER: self.side.sign(env, t_from=t_from, output=out)})

        async def events():
            sent = bytearray()
            for i in range(0, max(len(body), 1), 64):
                chunk = b"data: " + json.dumps(body[i:i + 64].decode("utf-8", "replace")).encode() + b"\n\n"
                sent += chunk
                yield chunk
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
            done = b"data: [DONE]\n\n"
            sent += done
            yield done
            yield SSE_JOB_PREFIX + self.side.sign(env, t_from=t_from, output=bytes(sent)).encode() + b"\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def _read_volume(self, body: bytes) -> bytes:
        try:
            name = str(json.loads(body)["name"])
        except (ValueError, KeyError, TypeError):
            raise Refused("malformed", 'send {"name": <file name>}', status_code=400) from None
        try:
            content = self.side.read_volume(name).decode(errors="replace")
        except OSError as exc:
            raise Refused("no_such_file", f"cannot read {name!r} from the job's volume: {exc.strerror} (put it "
                          "there first: PUT /jobs/<id>/volume/<name> through the miner proxy)",
                          status_code=404) from None
        return json.dumps({"name": name, "content": content}).encode()
