"""The inference engine interface of the LLM app: one interface, one module per implementation.

The app (and later the verifiers) only talk to :class:`InferenceEngine`; ``vllm_engine`` runs
vLLM in-process (batching, production path), ``transformers_engine`` runs a plain token loop on
transformers (no vLLM needed: a reference and a second dtype). What an implementation cannot do
is declared in :attr:`InferenceEngine.features`, never discovered with ``isinstance``.

Both implementations follow the same rules, so they produce the same tokens on the same weights:
greedy is the row's argmax, sampled requests use the keyed Gumbel choice of
:mod:`serve_apps.inference.gumbel` keyed by the request id, and generation stops after a stop
token (the tokenizer's eos, the chat template's end-of-turn token, the generation config's eos;
the stop token is yielded, so a verifier can check the decision to stop) or after
``max_tokens`` output tokens.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from pathlib import Path
from typing import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_apps.inference.gumbel import MAX_TOP_K

MAX_TOKENS_LIMIT = 512  # the most output tokens one request may ask for
MAX_PROMPT_TOKENS = 4096  # prompt + output must fit the engines' max_model_len (8192 for SmolLM2)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class EngineFeature(enum.Flag):
    BATCHING = enum.auto()  # concurrent requests share forward passes (else they queue)
    KEYED_SAMPLING = enum.auto()  # temperature > 0 with the keyed Gumbel sampler
    TOKEN_STREAMING = enum.auto()  # tokens are yielded as they are produced, not at the end


class GenerationRequest(BaseModel):
    """One generation, validated once at the interface, whatever the engine."""

    model_config = ConfigDict(extra="forbid")
    prompt_token_ids: list[int] = Field(min_length=1, max_length=MAX_PROMPT_TOKENS)
    max_tokens: int = Field(ge=1, le=MAX_TOKENS_LIMIT, description="most output tokens, stop token included")
    temperature: float = Field(ge=0, le=2, description="0 = greedy")
    top_k: int = Field(ge=1, le=MAX_TOP_K, description="keyed sampling draws among the top_k logits")
    key_hex: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="request id: the noise key")

    @model_validator(mode="after")
    def _sampled_needs_key(self) -> "GenerationRequest":
        if self.temperature > 0 and self.key_hex is None:
            raise ValueError("a sampled request (temperature > 0) needs key_hex (the request id)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class InferenceEngine(ABC):
    """Streams output token ids for a prompt. Subclasses set the attributes in ``__init__``."""

    features: EngineFeature = EngineFeature(0)
    model_name: str
    model_dir: Path
    weights_sha256: str
    tokenizer: object  # a transformers tokenizer with the model's chat template
    stop_token_ids: frozenset[int]

    async def generate(self, prompt_ids: list[int], *, max_tokens: int, temperature: float, top_k: int,
                       key_hex: str | None) -> AsyncIterator[int]:
        """Yield output token ids as they are produced (the stop token included, if any)."""
        req = GenerationRequest(prompt_token_ids=list(prompt_ids), max_tokens=max_tokens, temperature=temperature,
                                top_k=top_k, key_hex=key_hex)
        if not req.greedy and EngineFeature.KEYED_SAMPLING not in self.features:
            raise ValueError(f"{type(self).__name__} cannot sample; use temperature 0")
        async for token in self._generate(req):
            yield token

    @abstractmethod
    def _generate(self, req: GenerationRequest) -> AsyncIterator[int]:
        """The implementation: an async generator of output ids for a validated request."""

    @abstractmethod
    def close(self) -> None:
        """Free the engine (threads, memory); generate() fails afterwards."""


def stop_token_ids(tokenizer, model_dir: Path | None = None) -> frozenset[int]:
    """Tokens that end a generation, computed the same way for every engine."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        import json

        eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return frozenset(ids)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.chat_template:
        raise ValueError(f"the tokenizer in {model_dir} has no chat template")
    return tok


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids of a chat: the whitelisted chat template, generation prompt added. The
    verifier re-tokenises the signed request with this same function."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return [int(t) for t in out]
