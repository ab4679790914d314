"""The scoring backends by name: ``open_backend("vllm" | "transformers", model_dir, dtype=...)``.

The interface lives in :mod:`.scoring`; each implementation in its own module, imported here by
name only when chosen (vLLM and torch take seconds to import, and a host may lack one of them).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from cluster.verification.scoring import DTYPES, ScoringBackend

BACKENDS = {  # name -> (module, class)
    "vllm": ("cluster.verification.scoring_vllm", "VLLMScorer"),
    "transformers": ("cluster.verification.scoring_transformers", "TransformersScorer"),
}


def open_backend(kind: str, model_dir: str | Path, *, dtype: str = "float32", **options) -> ScoringBackend:
    """Load and warm up the backend ``kind`` (one of :data:`BACKENDS`) on ``model_dir``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if kind not in BACKENDS:
        raise ValueError(f"scoring backend must be one of {tuple(BACKENDS)}, got {kind!r}")
    module, cls = BACKENDS[kind]
    return getattr(importlib.import_module(module), cls)(Path(model_dir), dtype=dtype, **options)
