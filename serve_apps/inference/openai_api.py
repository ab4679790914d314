"""The OpenAI-compatible wire of the LLM app: request models, answers, errors, text decoding.

Why strict: an answer is only verifiable if the request says exactly what was asked. Fields the
app cannot honour verifiably (n > 1, stop strings, penalties, top_p != 1, logprobs, tools) are
refused with a 400 naming the field, never silently ignored; ``seed`` and ``user`` are accepted
and ignored (the sampling key is the request id: sha256 of the client-signed envelope, nothing
the miner or the client can shop with). Types are strict (a string where a number belongs is an
error, not coerced). Errors are rayhorde's one error shape with OpenAI's keys beside ``reason``
and ``message`` (:func:`openai_error`), so the official ``openai`` client raises them as its own.

Answers carry what a verifier needs: ``token_ids`` per choice (the output ids, stop token
included) and a top-level ``rayhorde`` object (request id = sampling key, temperature, top_k,
sampler, weights digest, prompt ids). Text is :func:`output_text` of the ids, so a verifier
checks that the claimed ids decode to the signed bytes with the same function.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.errors import BadRequest
from cluster.protocol.http import error_body
from serve_apps.inference.engine import MAX_TOKENS_LIMIT
from serve_apps.inference.gumbel import GUMBEL_VERSION, MAX_TOP_K

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
DEFAULT_TOP_K = MAX_TOP_K


def openai_error(message: str, *, code: str, type_: str = "invalid_request_error",
                 param: str | None = None) -> dict[str, Any]:
    """An error body the ``openai`` client reads (``message``, ``type``, ``param``, ``code``), in
    rayhorde's one shape: ``reason`` is the OpenAI ``code``."""
    return error_body(code, message, type=type_, param=param, code=code)


def bad_request_body(exc: BadRequest) -> dict[str, Any]:
    return openai_error(exc.message, code=exc.code, type_=exc.type, param=exc.param)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]
    name: str | None = None

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)
    top_p: float | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None  # accepted, ignored: the key is the request id
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if v is not None and v != 1:
            raise ValueError("top_p other than 1 is not supported: keyed sampling draws among the top_k tokens")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v:
            raise ValueError("stop strings are not supported (the model stops at its end-of-turn token)")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        if v:
            raise ValueError("penalties are not supported: they would make answers unverifiable")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    def resolved(self) -> tuple[int, float, int]:
        return (self.max_tokens or DEFAULT_MAX_TOKENS,
                DEFAULT_TEMPERATURE if self.temperature is None else float(self.temperature),
                self.top_k or DEFAULT_TOP_K)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)

    def resolved(self) -> tuple[int, float, int]:
        max_tokens, temperature, top_k = super().resolved()
        return (self.max_completion_tokens or max_tokens, temperature, top_k)


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    echo: bool | None = None
    suffix: None = None

    @field_validator("echo")
    @classmethod
    def _echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v


def parse(model: type[_Sampling], body: bytes) -> _Sampling:
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(raw, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        code = "unsupported_parameter" if err["type"] in ("value_error", "extra_forbidden") else "invalid_value"
        raise BadRequest(f"{param}: {err['msg']}{more}", param=param, code=code) from exc


def completion_prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """A completions prompt as ids: given ids as they are, text tokenised without extra tokens."""
    if isinstance(prompt, list):
        return list(prompt)
    return [int(t) for t in tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def output_text(tokenizer, ids: list[int], stop_ids) -> str:
    """The answer's text: the ids decoded, a final stop token and special tokens left out."""
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    """Incremental text of a growing id list, never emitting half a UTF-8 character: the
    concatenated deltas equal :func:`output_text` of the final ids."""

    def __init__(self, tokenizer, stop_ids) -> None:
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int, *, final: bool = False) -> str:
        self.ids.append(token)
        return self.flush(final=final)

    def flush(self, *, final: bool = True) -> str:
        full = output_text(self.tokenizer, self.ids, self.stop_ids)
        if not full.startswith(self.sent) or (not final and full.endswith("\ufffd")):
            return ""
        delta, self.sent = full[len(self.sent):], full
        return delta


def rayhorde_info(request_id: str, temperature: float, top_k: int, weights_sha256: str,
                  prompt_ids: list[int]) -> dict[str, Any]:
    greedy = temperature == 0 or top_k == 1
    return {"request_id": request_id, "key": request_id, "temperature": temperature, "top_k": top_k,
            "sampler": "greedy" if greedy else f"keyed_gumbel_v{GUMBEL_VERSION}",
            "weights_sha256": weights_sha256, "prompt_token_ids": prompt_ids}


def usage(prompt_ids: list[int], output_ids: list[int]) -> dict[str, int]:
    return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(output_ids),
            "total_tokens": len(prompt_ids) + len(output_ids)}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
