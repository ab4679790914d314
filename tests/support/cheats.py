"""Cheating miners, for the verifier's tests and the detection benchmark. Nothing here is on a
production path.

A cheating miner is the real LLM app (:class:`~tests.support.llm_claims.InProcessJob`) on a
cheating engine: the app still builds the answer's bytes (ids, text, SSE chunks) and signs them,
so every cheat is self-consistent and correctly signed, and only the verifier's prefill check
can catch it:

- :class:`ScriptedEngine` yields ids a test chose (a token swapped and the answer continued
  greedily, an answer cut short, a forced stop; :class:`CheatMaker` picks them);
- :class:`TwistedEngine` runs the honest engine on a changed request (another temperature,
  another key, the system prompt dropped, the context truncated);
- a :class:`TransformersEngine` on another model folder (:mod:`tests.support.cheat_models`),
  claiming the whitelisted digest and name (:func:`liar`);
- :class:`OtherModelEngine`: another model with another tokenizer whose output TEXT is
  re-tokenised with the whitelisted tokenizer, which is what such a miner would have to send;
- :func:`edit_text`: an honest answer's text edited after the job signed it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import AsyncIterator, Callable

from cluster.verification.models import Claim
from serve_apps.inference.engine import EngineFeature, GenerationRequest, InferenceEngine


class _Wrapper(InferenceEngine):
    features = EngineFeature.KEYED_SAMPLING | EngineFeature.TOKEN_STREAMING

    def __init__(self, like: InferenceEngine) -> None:
        self.model_name, self.model_dir = like.model_name, like.model_dir
        self.weights_sha256 = like.weights_sha256  # claims the whitelisted weights whatever it runs
        self.tokenizer, self.stop_token_ids = like.tokenizer, like.stop_token_ids

    def close(self) -> None:
        pass


class ScriptedEngine(_Wrapper):
    """Yields ids chosen by the caller, whatever the model says: ``script`` maps a request id
    (the app passes it as the key of every request) to the ids, or is a function of the request."""

    def __init__(self, like: InferenceEngine,
                 script: dict[str, list[int]] | Callable[[GenerationRequest], list[int]]) -> None:
        super().__init__(like)
        self.script = script

    async def _generate(self, req: GenerationRequest) -> AsyncIterator[int]:
        ids = self.script[req.key_hex] if isinstance(self.script, dict) else self.script(req)
        for token in ids:
            yield int(token)


class TwistedEngine(_Wrapper):
    """The honest engine on a changed request: ``twist(request) -> dict`` of generate() keywords
    (prompt_ids, max_tokens, temperature, top_k, key_hex) that replace the request's."""

    def __init__(self, inner: InferenceEngine, twist: Callable[[GenerationRequest], dict]) -> None:
        super().__init__(inner)
        self.inner, self.twist = inner, twist

    async def _generate(self, req: GenerationRequest) -> AsyncIterator[int]:
        args = {"prompt_ids": req.prompt_token_ids, "max_tokens": req.max_tokens, "temperature": req.temperature,
                "top_k": req.top_k, "key_hex": req.key_hex, **self.twist(req)}
        async for token in self.inner.generate(args.pop("prompt_ids"), **args):
            yield token


def drop_system_prompt(prompt_ids: list[int], tokenizer) -> list[int]:
    """The chat's first block removed when it is a system block (``<|im_start|>system ... <|im_end|>\\n``)."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    system = tokenizer("system", add_special_tokens=False)["input_ids"]
    if prompt_ids[:1 + len(system)] != [start, *system] or end not in prompt_ids:
        return prompt_ids
    cut = prompt_ids.index(end) + 1
    if cut < len(prompt_ids) and tokenizer.decode([prompt_ids[cut]]) == "\n":
        cut += 1
    return prompt_ids[cut:]


class OtherModelEngine(_Wrapper):
    """Another model, another tokenizer: the whitelisted prompt is decoded to text, the other
    model continues it greedily, and its output TEXT is re-tokenised with the whitelisted
    tokenizer (plus the end-of-turn stop token): the only way such a miner can send ids at all."""

    def __init__(self, like: InferenceEngine, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__(like)
        self._torch = torch
        self.other_tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def complete(self, req: GenerationRequest) -> list[int]:
        torch = self._torch
        text = self.tokenizer.decode(req.prompt_token_ids, skip_special_tokens=False)
        enc = self.other_tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=req.max_tokens, do_sample=False)
        new = self.other_tokenizer.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)
        ids = self.tokenizer(new, add_special_tokens=False)["input_ids"][:req.max_tokens - 1]
        if not ids:
            ids = self.tokenizer("\n", add_special_tokens=False)["input_ids"][:1]
        return [int(t) for t in ids if t not in self.stop_token_ids] + [min(self.stop_token_ids)]

    async def _generate(self, req: GenerationRequest) -> AsyncIterator[int]:
        for token in await asyncio.to_thread(self.complete, req):
            yield token


def liar(engine: InferenceEngine, like: InferenceEngine) -> InferenceEngine:
    """``engine`` (another folder) presenting itself as ``like``: same name, same claimed digest."""
    engine.model_name, engine.weights_sha256 = like.model_name, like.weights_sha256
    return engine


def edit_text(claim: Claim) -> bytes:
    """The claim's response bytes with the answer's text changed and the ids left alone (as if
    edited after the job signed: the bytes still parse, the text no longer decodes from the ids)."""
    from serve_apps.inference.openai_api import dumps

    raw = claim.response_body
    if raw.lstrip().startswith(b"{"):
        obj = json.loads(raw)
        choice = obj["choices"][0]
        field = choice.setdefault("message", {}) if "message" in choice else choice
        key = "content" if "message" in choice else "text"
        field[key] = "Edited: " + (field.get(key) or "")
        return dumps(obj)
    events = raw.split(b"\n\n")
    for i, event in enumerate(events):
        if not event.startswith(b"data: {"):
            continue
        obj = json.loads(event[6:])
        for choice in obj.get("choices") or []:
            if choice.get("token_ids"):
                if "delta" in choice:
                    choice["delta"]["content"] = "Edited: " + (choice["delta"].get("content") or "")
                else:
                    choice["text"] = "Edited: " + (choice.get("text") or "")
                events[i] = b"data: " + dumps(obj)
                return b"\n\n".join(events)
    raise ValueError("no answer chunk to edit")


class CheatMaker:
    """Builds per-answer cheats from honest claims, choosing tokens the model ranks at least
    ``margin + safety`` below its choice (scored by ``picker``, a verifier: another dtype than the
    judge's is fine, the safety covers it). ``generator`` continues a swapped answer greedily."""

    def __init__(self, generator: InferenceEngine, picker, margin: float, *, seed: int = 0,
                 safety: float = 1.0) -> None:
        import random

        self.generator, self.picker, self.margin, self.safety = generator, picker, margin, safety
        self.rng = random.Random(seed)
        self.stop_ids = generator.stop_token_ids

    def _greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        async def go():
            return [t async for t in self.generator.generate(prompt, max_tokens=max_tokens, temperature=0, top_k=20,
                                                             key_hex=None)]
        return asyncio.run(go()) if max_tokens > 0 else []

    def swap(self, claim: Claim) -> tuple[list[int], int]:
        """(cheat ids, swap position): one token swapped at a seeded position for a token at least
        the margin below the model's choice (greedy: in log-probability; sampled: in keyed score),
        and the answer continued greedily from there, so ids and text stay consistent."""
        import numpy as np

        from serve_apps.inference.gumbel import keyed_candidates

        p = self.picker.prepare(claim)
        ids = p.output_ids
        scores = self.picker.backend.score([(p.prompt_ids, ids)])[0]
        need = self.margin + self.safety
        positions = list(range(len(ids)))
        self.rng.shuffle(positions)
        for pos in positions:
            top_ids, top_lps = scores.top_ids[pos], scores.top_logprobs[pos]
            if p.greedy:
                ranked = [(int(t), float(top_lps[0] - lp)) for t, lp in zip(top_ids, top_lps)]
            else:
                row = np.full(int(top_ids.max()) + 1, -np.inf)
                row[top_ids] = top_lps
                cands, keyed = keyed_candidates(row, p.request_id, pos, p.temperature, p.top_k)
                ranked = [(int(t), float((keyed[0] - k) * p.temperature)) for t, k in zip(cands, keyed)]
                kth = float(np.sort(top_lps)[::-1][p.top_k - 1])  # outside the candidates: fails whatever
                ranked += [(int(t), 1e9) for t, lp in zip(top_ids, top_lps) if lp < kth - need]
            for token, gap in ranked:
                if gap >= need and token not in self.stop_ids and token != ids[pos]:
                    head = ids[:pos] + [token]
                    return head + self._greedy(p.prompt_ids + head, p.max_tokens - len(head)), pos
        raise ValueError("no position of this answer has a token far enough below the model's choice")

    def truncate(self, claim: Claim) -> tuple[list[int], int]:
        """(the answer cut at half its length without a stop token, the cut)."""
        ids = self.picker.prepare(claim).output_ids
        cut = max(1, len(ids) // 2)
        if cut >= len(ids):
            raise ValueError("the answer is too short to cut")
        return ids[:cut], cut

    def forced_stop(self, claim: Claim) -> tuple[list[int], int]:
        """(the answer cut at a seeded position and ended with a stop token the model does not
        choose there, by at least the margin (greedy or keyed), that position)."""
        import dataclasses

        from cluster.verification.verifier import check_positions

        p = self.picker.prepare(claim)
        stop = min(self.stop_ids)
        cuts = list(range(1, len(p.output_ids)))
        self.rng.shuffle(cuts)
        for cut in cuts[:8]:
            ids = p.output_ids[:cut] + [stop]
            cheat = dataclasses.replace(p, output_ids=ids)
            if check_positions(self.picker.backend.score([(p.prompt_ids, ids)])[0], cheat,
                               self.margin + self.safety).first_fail == cut:
                return ids, cut
        raise ValueError("no cut where stopping is far enough below the model's choice")
