"""vLLM, in this process, behind :class:`InferenceEngine`: the production engine of the LLM app.

Why in-process: a Serve replica is one Ray worker process; vLLM's default multi-process engine
doubles its memory, takes ~30 s instead of ~13 s to start on CPU and orphans children when a
raylet dies (measured on a 2-core CPU machine). So ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and one background thread owns
a ``vllm.v1.engine.llm_engine.LLMEngine``: it creates the engine (vLLM's CPU worker sets torch's
thread settings on the thread that builds it, which must be the thread that runs the forward
passes), then loops: take new requests and aborts from a queue, ``step()``, push each request's
new token ids to its asyncio queue with ``call_soon_threadsafe``. Concurrent requests therefore
batch together and stream token by token. Keyed sampling is done by
:class:`serve_apps.inference.vllm_processor.KeyedGumbel`, batch-independent.

Environment (set here with ``setdefault`` before vLLM is imported, so a replica's own settings
win): :data:`VLLM_ENV`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import AsyncIterator

from serve_apps.inference.engine import (
    MAX_PROMPT_TOKENS, MAX_TOKENS_LIMIT, EngineFeature, GenerationRequest, InferenceEngine, load_tokenizer,
    stop_token_ids,
)
from cluster.protocol.whitelist import weights_digest

log = logging.getLogger("rayhorde.llm.vllm")

VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine stays in this process (see the docstring)
    "VLLM_USE_V2_MODEL_RUNNER": "0",  # KeyedGumbel implements the V1 logits-processor interface
    "VLLM_HOST_IP": "127.0.0.1",  # torch.distributed's single-rank group binds loopback only
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # default pins every engine on the box to core 0
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache (~23k tokens of SmolLM2-135M in fp32)
    "VLLM_NO_USAGE_STATS": "1",  # offline: no usage reporting thread
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",  # the model folder is local; never ask a hub
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_vllm_env() -> None:
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)


def _tolerate_context_proxies() -> None:
    """vLLM 0.32's CPU worker registers its kernels by scanning every loaded module's globals with
    ``hasattr(value, "__dict__")``. A werkzeug ``LocalProxy`` outside its context (``flask``'s
    ``current_app``, loaded in any process that imported flask, e.g. through moto) raises
    RuntimeError there instead of answering False, and the engine fails to start. Give that one
    vLLM module a ``hasattr`` that reads any error as False (the scan skips such values anyway)."""
    import builtins

    from vllm.triton_utils import dispatcher

    def tolerant_hasattr(obj: object, name: str) -> bool:
        try:
            return builtins.hasattr(obj, name)
        except Exception:  # noqa: BLE001 - a proxy without its context
            return False

    dispatcher.hasattr = tolerant_hasattr  # module globals shadow builtins for that module only


class VLLMEngine(InferenceEngine):
    features = EngineFeature.BATCHING | EngineFeature.KEYED_SAMPLING | EngineFeature.TOKEN_STREAMING

    def __init__(self, model_dir: str | Path, *, model_name: str | None = None, dtype: str = "float32",
                 max_num_seqs: int = 16, weights_sha256: str | None = None, start_timeout_s: float = 600) -> None:
        apply_vllm_env()
        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.weights_sha256 = weights_sha256 or weights_digest(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.model_dir)
        self._dtype, self._max_num_seqs = dtype, max_num_seqs
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rayhorde-vllm", daemon=True)
        t0 = time.monotonic()
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            raise TimeoutError(f"vLLM did not start within {start_timeout_s:g} s")
        if self._error is not None:
            raise RuntimeError(f"vLLM failed to start: {self._error!r}") from self._error
        self.start_s = time.monotonic() - t0

    # -- the engine thread ------------------------------------------------------------------

    def _build(self):
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        _tolerate_context_proxies()

        from serve_apps.inference.vllm_processor import KeyedGumbel

        args = EngineArgs(model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=self._dtype,
                          enforce_eager=True, max_model_len=MAX_PROMPT_TOKENS + MAX_TOKENS_LIMIT,
                          max_num_seqs=self._max_num_seqs, seed=0, generation_config="vllm",
                          logits_processors=[KeyedGumbel], disable_log_stats=True)
        return LLMEngine.from_engine_args(args)

    def _run(self) -> None:
        try:
            engine = self._build()
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(engine)
        except BaseException as exc:
            log.exception("the vLLM engine thread failed")
            self._error = exc
            for rid in list(self._streams):
                self._push(rid, exc)
        finally:
            try:
                engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                log.warning("vLLM shutdown failed", exc_info=True)

    def _loop(self, engine) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from serve_apps.inference.vllm_processor import keyed_extra_args

        while True:
            block = not engine.has_unfinished_requests()
            while True:
                try:
                    cmd = self._commands.get(block=block, timeout=0.5 if block else None)
                except queue.Empty:
                    break
                block = False
                if cmd is None:
                    return
                kind, rid, req = cmd
                if kind == "abort":
                    engine.abort_request([rid])
                    continue
                params = SamplingParams(
                    max_tokens=req.max_tokens, temperature=0.0, top_k=0, detokenize=False,
                    stop_token_ids=sorted(self.stop_token_ids), output_kind=RequestOutputKind.DELTA,
                    extra_args=None if req.greedy else keyed_extra_args(req.key_hex, req.temperature, req.top_k))
                try:
                    engine.add_request(rid, {"prompt_token_ids": req.prompt_token_ids}, params)
                except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                    self._push(rid, exc)
            if not engine.has_unfinished_requests():
                continue
            for out in engine.step():
                for completion in out.outputs:
                    for token in completion.token_ids:
                        self._push(out.request_id, int(token))
                if out.finished:
                    self._push(out.request_id, None)

    def _push(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    # -- the asyncio side -------------------------------------------------------------------

    async def _generate(self, req: GenerationRequest) -> AsyncIterator[int]:
        if self._closed or self._error is not None:
            raise RuntimeError(f"the vLLM engine is closed{f' ({self._error!r})' if self._error else ''}")
        rid = f"r{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", rid, req))
        finished = False
        try:
            while True:
                item = await q.get()
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise RuntimeError(f"vLLM failed on this request: {item!r}") from item
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:  # the consumer went away (client disconnected): free the slot
                self._commands.put(("abort", rid, None))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._commands.put(None)
        self._thread.join(60)
