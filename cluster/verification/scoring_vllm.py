"""vLLM behind :class:`ScoringBackend`: ``prompt_logprobs=20`` over prompt + claimed ids, batched.

Each claim becomes one request ``SamplingParams(max_tokens=1, prompt_logprobs=20)`` over the
prompt followed by the claimed output ids: its prompt log-probabilities at the output positions
are the verifier's scores (top 20 with their ranks, plus the claimed token's own log-probability
and rank when it is outside them). All claims of a call are added to the engine at once, so vLLM
schedules them together: one prefill pass per claim, batched, no decoding beyond one token.
Prefix caching is off: every score is recomputed, none is reused from another claim.

In-process, like the LLM app's engine (``serve_apps.inference.vllm_engine``, whose environment
and context-proxy workaround this reuses): ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, and one worker
thread builds the ``LLMEngine`` and runs every call (vLLM's CPU worker sets torch's thread settings
on the thread that builds it). The first ``prompt_logprobs`` call in a process costs 10-14 s
extra on CPU (measured on a 2-core box), so the constructor warms up.

Sharing a process with another in-process vLLM engine (tests, the benchmark): vLLM keeps its
distributed groups and forward context in module globals. A scorer built while another engine is
alive is a *guest*: its :meth:`close` frees its own engine without tearing those globals down
(which would break the other engine). Never run a forward pass on two in-process engines at the
same time (the forward context is one global); production verifiers run alone in their actor.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from cluster.verification.scoring import TOP_K, PositionScores, ScoringBackend, ScoringFeature
from serve_apps.inference.engine import MAX_PROMPT_TOKENS, MAX_TOKENS_LIMIT

log = logging.getLogger("rayhorde.verification.vllm")


class VLLMScorer(ScoringBackend):
    name = "vllm"
    features = ScoringFeature.BATCHED_PREFILL

    def __init__(self, model_dir: Path, *, dtype: str = "float32", max_num_seqs: int = 32,
                 max_claims_per_call: int = 64) -> None:
        from serve_apps.inference.vllm_engine import apply_vllm_env

        apply_vllm_env()
        t0 = time.monotonic()
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.max_claims_per_call = max_claims_per_call
        self._max_num_seqs = max_num_seqs
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayhorde-verify-vllm")
        self._engine = None
        self.guest = False
        self._worker.submit(self._build).result()
        self.vocab_size = int(self._engine.model_config.get_vocab_size())
        self.score([(list(range(1, 17)), list(range(17, 25)))])  # warm-up: the first logprobs call is slow
        self.start_s = time.monotonic() - t0

    def _build(self) -> None:
        import torch
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from serve_apps.inference.vllm_engine import _tolerate_context_proxies

        _tolerate_context_proxies()
        self.guest = torch.distributed.is_available() and torch.distributed.is_initialized()
        args = EngineArgs(model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=self.dtype,
                          enforce_eager=True, max_model_len=MAX_PROMPT_TOKENS + MAX_TOKENS_LIMIT,
                          max_num_seqs=self._max_num_seqs, seed=0, generation_config="vllm",
                          enable_prefix_caching=False, max_logprobs=TOP_K, disable_log_stats=True)
        self._engine = LLMEngine.from_engine_args(args)

    def score(self, items: Sequence[tuple[list[int], list[int]]]) -> list[PositionScores]:
        if self._engine is None:
            raise RuntimeError("the vLLM scorer is closed")
        out: list[PositionScores] = []
        with self._lock:
            for i in range(0, len(items), self.max_claims_per_call):
                out.extend(self._worker.submit(self._score, items[i:i + self.max_claims_per_call]).result())
        return out

    def _score(self, items: Sequence[tuple[list[int], list[int]]]) -> list[PositionScores]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = self._engine
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=TOP_K, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        rids = []
        for prompt, output in items:
            if not output:
                raise ValueError("a claim to score needs at least one output id")
            rid = f"v{next(self._ids)}"
            engine.add_request(rid, {"prompt_token_ids": list(prompt) + list(output)}, params)
            rids.append(rid)
        done: dict[str, object] = {}
        try:
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        done[o.request_id] = o
        except BaseException:
            engine.abort_request([r for r in rids if r not in done])
            raise
        return [_position_scores(done[rid].prompt_logprobs, prompt, output)
                for rid, (prompt, output) in zip(rids, items)]

    def close(self) -> None:
        if self._engine is None:
            return
        engine, self._engine = self._engine, None
        try:
            self._worker.submit(_shutdown, engine, self.guest).result(120)
        finally:
            self._worker.shutdown(wait=True)


def _position_scores(prompt_logprobs, prompt: list[int], output: list[int]) -> PositionScores:
    n, start = len(output), len(prompt)
    top_ids = np.zeros((n, TOP_K), dtype=np.int64)
    top_lps = np.full((n, TOP_K), -np.inf, dtype=np.float64)
    claimed = np.empty(n, dtype=np.float64)
    for j in range(n):
        entry = prompt_logprobs[start + j]  # {token id: Logprob(logprob, rank, ...)}: the top 20 + the actual token
        ranked = sorted(((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank <= TOP_K),
                        key=lambda r: (r[0], r[1]))[:TOP_K]
        for i, (_, tok, lp) in enumerate(ranked):
            top_ids[j, i], top_lps[j, i] = tok, lp
        claimed[j] = entry[output[j]].logprob
    return PositionScores(top_ids=top_ids, top_logprobs=top_lps, claimed_logprobs=claimed)


def _shutdown(engine, guest: bool) -> None:
    """Free one in-process engine. A guest leaves vLLM's process-wide state (distributed groups)
    to the engine that created it (see the module docstring)."""
    import gc

    client = engine.engine_core
    if not guest:
        client.shutdown()
        return
    core = getattr(client, "engine_core", None)
    finalizer = getattr(client, "_finalizer", None)
    if finalizer is not None:
        finalizer.detach()  # its callback would run the full shutdown when the client is collected
    try:
        if core is not None and core.model_executor:
            core.model_executor.shutdown()
        if core is not None and core.scheduler:
            core.scheduler.shutdown()
    except Exception:  # noqa: BLE001 - best effort: the memory goes with the objects anyway
        log.warning("vLLM scorer shutdown (guest) failed", exc_info=True)
    gc.unfreeze()
    gc.collect()
