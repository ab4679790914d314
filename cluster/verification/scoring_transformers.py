"""transformers behind :class:`ScoringBackend`: one forward pass per claim, whole rows.

Uses the LLM app's own :class:`TransformersEngine` (same loading, same dtype choice) and its
:meth:`~TransformersEngine.logits_rows`: the float32 next-token logits after the prompt and after
each claimed token but the last, i.e. one prefill pass over prompt + claimed ids. Rows become
log-probabilities (log-softmax in float32), from which the top :data:`TOP_K` and the claimed
token's value are taken, the same shape the vLLM backend returns. No vLLM needed: a CPU
verifier's second dtype (``bfloat16``) and a reference for the vLLM backend.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from cluster.verification.scoring import TOP_K, PositionScores, ScoringBackend, ScoringFeature


class TransformersScorer(ScoringBackend):
    name = "transformers"
    features = ScoringFeature.FULL_VOCAB

    def __init__(self, model_dir: Path, *, dtype: str = "float32", weights_sha256: str | None = None) -> None:
        from serve_apps.inference.transformers_engine import TransformersEngine

        t0 = time.monotonic()
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.engine = TransformersEngine(self.model_dir, dtype=dtype, weights_sha256=weights_sha256)
        self.vocab_size = int(self.engine.model.config.vocab_size)
        self._torch = self.engine._torch
        self.score([(list(range(1, 9)), list(range(9, 13)))])  # warm-up (first pass allocates)
        self.start_s = time.monotonic() - t0

    def score(self, items: Sequence[tuple[list[int], list[int]]]) -> list[PositionScores]:
        if self.engine is None:
            raise RuntimeError("the transformers scorer is closed")
        torch = self._torch
        out = []
        for prompt, output in items:
            if not output:
                raise ValueError("a claim to score needs at least one output id")
            rows = self.engine.logits_rows(list(prompt), list(output))  # [n, V] float32: one prefill pass
            lps = torch.log_softmax(rows, dim=-1)
            top = torch.topk(lps, TOP_K, dim=-1)  # sorted, best first
            claimed = lps.gather(1, torch.tensor(output, dtype=torch.long).unsqueeze(1)).squeeze(1)
            out.append(PositionScores(top_ids=top.indices.numpy().astype(np.int64),
                                      top_logprobs=top.values.double().numpy(),
                                      claimed_logprobs=claimed.double().numpy()))
        return out

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
