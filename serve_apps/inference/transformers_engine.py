"""transformers behind :class:`InferenceEngine`: a plain token loop with a KV cache.

Why it exists next to vLLM: it needs nothing but torch + transformers, so it is the reference
the vLLM engine is tested against (same weights: greedy output agrees token for token), the
second dtype (``dtype="bfloat16"``), and the model a CPU verifier can reuse. It does not batch:
requests run one at a time on one worker thread (the forward passes hold the cores anyway).
Token choice is exactly the vLLM engine's: ``argmax`` for greedy, :func:`keyed_choice` for
sampled requests, on the float32 view of the last position's logits.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator

from serve_apps.inference.engine import (
    EngineFeature, GenerationRequest, InferenceEngine, load_tokenizer, stop_token_ids,
)
from serve_apps.inference.gumbel import keyed_choice
from cluster.protocol.whitelist import weights_digest

_DTYPES = ("float32", "bfloat16")


class TransformersEngine(InferenceEngine):
    features = EngineFeature.KEYED_SAMPLING | EngineFeature.TOKEN_STREAMING

    def __init__(self, model_dir: str | Path, *, model_name: str | None = None, dtype: str = "float32",
                 weights_sha256: str | None = None) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        import torch
        from transformers import AutoModelForCausalLM

        t0 = time.monotonic()
        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.weights_sha256 = weights_sha256 or weights_digest(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.model_dir)
        self.dtype = dtype
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, dtype)).eval()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayhorde-hf")
        self._closed = False
        self.start_s = time.monotonic() - t0

    def logits_rows(self, prompt_ids: list[int], output_ids: list[int]):
        """float32 next-token logits after the prompt and after each output token but the last
        (one prefill pass: what a verifier scores a claimed answer with), shape [len(output_ids), V]."""
        torch = self._torch
        ids = torch.tensor([list(prompt_ids) + list(output_ids)])
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0]
        return logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(output_ids)].float()

    def _run(self, req: GenerationRequest, emit, cancelled: threading.Event) -> None:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([req.prompt_token_ids]), use_cache=True)
            for step in range(req.max_tokens):
                if cancelled.is_set():
                    return
                row = out.logits[0, -1].float()
                token = keyed_choice(row, req.key_hex, step, 0.0 if req.greedy else req.temperature, req.top_k)
                emit(token)
                if token in self.stop_token_ids or step == req.max_tokens - 1:
                    return
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                                 use_cache=True)

    async def _generate(self, req: GenerationRequest) -> AsyncIterator[int]:
        if self._closed:
            raise RuntimeError("the transformers engine is closed")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def work() -> None:
            try:
                self._run(req, lambda t: loop.call_soon_threadsafe(q.put_nowait, t), cancelled)
                loop.call_soon_threadsafe(q.put_nowait, done)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                loop.call_soon_threadsafe(q.put_nowait, exc)

        self._worker.submit(work)
        try:
            while True:
                item = await q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise RuntimeError(f"transformers failed on this request: {item!r}") from item
                yield item
        finally:
            cancelled.set()  # a consumer that left early stops the loop at its next token

    def close(self) -> None:
        self._closed = True
        self._worker.shutdown(wait=True, cancel_futures=True)
