"""The verifier's scoring backends: ONE prefill pass over prompt + claimed output ids, per claim.

A backend turns ``(prompt ids, claimed output ids)`` pairs into, for every output position ``j``
(the distribution the model gives the ``j``-th output token, after the prompt and the first ``j``
claimed tokens): the top :data:`TOP_K` token ids and their log-probabilities, best first, and the
log-probability of the claimed token itself (even when it is outside the top). That is all the
verifier needs: the greedy check compares the claimed token with the top-1, and the keyed Gumbel
check (sampling among the top ``k <= 20``) recomputes the choice from the top-``k`` log-probabilities,
since adding a constant to a row of logits changes no choice (``gumbel`` module docstring).

This module is the interface. One module per implementation, which imports this one (never the
other way round), chosen by name in :mod:`.scoring_backends` (``open_backend``); what an
implementation can or cannot do is declared in :attr:`ScoringBackend.features`, never
discovered with ``isinstance``:

- ``vllm`` (:mod:`.scoring_vllm`): ``SamplingParams(max_tokens=1, prompt_logprobs=20)`` over each
  claim, many claims in ONE engine call (batched prefill); the production path (CUDA on the
  verification cluster, CPU in CI);
- ``transformers`` (:mod:`.scoring_transformers`): one forward pass per claim on
  :meth:`TransformersEngine.logits_rows`; sees the whole vocabulary row; the second dtype.

Both load the same whitelisted fp32 folder (``serve_apps.inference.model.ensure_model``) and may
run it as ``float32`` or ``bfloat16``: honest answers from other hardware and dtypes must pass
within the calibrated margin.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from serve_apps.inference.gumbel import MAX_TOP_K

TOP_K = MAX_TOP_K  # vLLM's prompt_logprobs cover at most 20 tokens; keyed sampling draws among <= 20
DTYPES = ("float32", "bfloat16")


class ScoringFeature(enum.Flag):
    NONE = 0
    BATCHED_PREFILL = enum.auto()  # many claims share one engine call (one prefill pass each)
    FULL_VOCAB = enum.auto()  # the backend sees whole rows (else the top 20 plus the claimed token)


@dataclass
class PositionScores:
    """What one prefill pass says about one claim's output positions (``n`` = output length)."""

    top_ids: np.ndarray  # [n, TOP_K] int64, best first
    top_logprobs: np.ndarray  # [n, TOP_K] float64, descending
    claimed_logprobs: np.ndarray  # [n] float64: the log-probability of each claimed token

    def __post_init__(self) -> None:
        n = self.claimed_logprobs.shape[0]
        if self.top_ids.shape != (n, TOP_K) or self.top_logprobs.shape != (n, TOP_K):
            raise ValueError(f"scores for {n} positions need [{n}, {TOP_K}] top arrays, got "
                             f"{self.top_ids.shape} and {self.top_logprobs.shape}")


class ScoringBackend(ABC):
    """Scores claims. Subclasses set the attributes in ``__init__`` and warm up there."""

    name: str  # "vllm" / "transformers"
    dtype: str
    features: ScoringFeature = ScoringFeature.NONE
    model_dir: Path
    vocab_size: int  # the model's logits width: claimed ids must lie below it
    start_s: float = 0.0  # seconds to load and warm up

    @abstractmethod
    def score(self, items: Sequence[tuple[list[int], list[int]]]) -> list[PositionScores]:
        """``items``: (prompt ids, claimed output ids) pairs, output non-empty. One prefill pass each."""

    @abstractmethod
    def close(self) -> None:
        """Free the engine; ``score`` fails afterwards."""

    @property
    def label(self) -> str:
        return f"{self.name}-{self.dtype}"
