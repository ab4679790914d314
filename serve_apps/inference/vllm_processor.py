"""Keyed Gumbel sampling inside vLLM 0.32 (V1 model runner): a batch-level logits processor.

vLLM 0.32 dropped per-request logits processors. What remains is a processor CLASS given at
engine creation (``LLM(..., logits_processors=[KeyedGumbel])`` or the name
``"serve_apps.inference.vllm_processor:KeyedGumbel"``: vLLM may load it in another process,
so it must be importable by name), which sees every request as it joins the persistent batch and
every step's ``[num_reqs, V]`` logits. A request switches it on through
``SamplingParams(temperature=0, extra_args={"rayhorde_keyed": {"key": <request id>,
"temperature": T, "top_k": k}})``.

For such a request, at each step, the processor computes the choice with
:func:`serve_apps.inference.gumbel.keyed_choice` on the row's raw float32 logits (the
output position is the length of the request's output so far), then sets every other logit of
the row to -inf. vLLM applies non-argmax-invariant processors before its greedy argmax and the
request itself runs at temperature 0 (greedy), so vLLM picks exactly that token. No vLLM random
state is involved, so the choice is the same whatever else shares the batch, and a verifier
recomputes it from the same function. Requests without the extra arg are left untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from serve_apps.inference.gumbel import MAX_TOP_K, keyed_choice

EXTRA_ARG = "rayhorde_keyed"


def keyed_extra_args(key_hex: str, temperature: float, top_k: int) -> dict[str, Any]:
    """The ``SamplingParams.extra_args`` that switch the processor on for one request."""
    return {EXTRA_ARG: {"key": key_hex, "temperature": float(temperature), "top_k": int(top_k)}}


def _keyed_args(params: SamplingParams) -> tuple[str, float, int] | None:
    spec = (params.extra_args or {}).get(EXTRA_ARG)
    if spec is None:
        return None
    return str(spec["key"]), float(spec["temperature"]), int(spec["top_k"])


class KeyedGumbel(LogitsProcessor):
    """Makes the token choice for keyed requests (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        spec = (sampling_params.extra_args or {}).get(EXTRA_ARG)
        if spec is None:
            return
        if not isinstance(spec, dict) or set(spec) != {"key", "temperature", "top_k"}:
            raise ValueError(f"extra_args[{EXTRA_ARG!r}] must be {{key, temperature, top_k}}, got {spec!r}")
        key, temperature, top_k = _keyed_args(sampling_params)
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError("the keyed sampler's key must be 64 lowercase hex digits (a request id)")
        if not temperature > 0 or not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"keyed sampling needs temperature > 0 and 1 <= top_k <= {MAX_TOP_K}")
        if sampling_params.temperature != 0:
            raise ValueError("a keyed request must run at vLLM temperature 0: the processor makes the choice")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        # batch index -> (key, temperature, top_k, the request's live output token list)
        self.requests: dict[int, tuple[str, float, int, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax: vLLM must apply it before greedy sampling

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(params: SamplingParams, _prompt_ids, output_ids: list[int]):
            keyed = _keyed_args(params)
            return None if keyed is None else (*keyed, output_ids)

        process_dict_updates(self.requests, batch_update, new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (key, temperature, top_k, output_ids) in self.requests.items():
            if index >= logits.shape[0]:
                continue
            row = logits[index]
            chosen = keyed_choice(row, key, len(output_ids), temperature, top_k)
            value = row[chosen].item()
            row.fill_(float("-inf"))
            row[chosen] = value
        return logits
