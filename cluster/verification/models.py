"""What crosses the verification boundary: claims in, verdicts out (pydantic, JSON only).

A :class:`Claim` is one streamed or buffered LLM answer exactly as validator-core collected it
from a miner's proxy: the client-signed request envelope (and its signature), the request and
response bytes, the miner-counter-signed receipt, and the job's readiness facts. validator-core
checks every signature and the receipt chain BEFORE a claim reaches a verifier; a verifier
re-derives everything it scores from these bytes (never the miner's prompt ids or its
``rayhorde`` object): the path and sampling key from the envelope (key = sha256 of the canonical
envelope = the request id), the prompt by re-tokenising the signed request body with the
whitelisted chat template, the claimed output ids from the response body.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from pydantic import BaseModel, Field, field_serializer, field_validator

from cluster.protocol.receipts import Receipt

VERDICT_VERSION = 1


class Claim(BaseModel):
    job_id: str
    miner_hotkey: str
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the whitelisted digest the job announced")
    route_prefix: str  # "/jobs/<job_id>": the envelope's path minus this is the app route
    envelope: bytes  # canonical JSON of the client's RequestEnvelope (X-Rayhorde-Request, decoded)
    client_sig: str  # hex, the client key's signature over ``envelope``
    request_body: bytes
    response_body: bytes  # SSE: every byte before the receipt line
    receipt: Receipt

    @field_serializer("envelope", "request_body", "response_body")
    def _b64(self, v: bytes) -> str:
        return base64.b64encode(v).decode()

    @field_validator("envelope", "request_body", "response_body", mode="before")
    @classmethod
    def _unb64(cls, v: Any) -> Any:
        return base64.b64decode(v, validate=True) if isinstance(v, str) else v

    @property
    def request_id(self) -> str:
        return hashlib.sha256(self.envelope).hexdigest()


class Evidence(BaseModel):
    """Why a position failed (or the closest call of an answer that passed)."""

    position: int  # index into the claimed output ids
    claimed_id: int
    expected_id: int  # argmax (greedy) or the keyed choice recomputed by the verifier
    claimed_score: float  # logprob (greedy) or T * (logprob/T + gumbel) = logprob + T*gumbel (keyed: the
    #                       sampler's logit/T + gumbel order, in log-probability units like the margin)
    expected_score: float
    gap: float  # expected_score - claimed_score (>= 0)


class Verdict(BaseModel):
    v: int = VERDICT_VERSION
    request_id: str
    job_id: str
    miner_hotkey: str
    ok: bool
    reason: str  # "ok", or a stable code: not_argmax, keyed_choice_mismatch, decode_mismatch,
    #              ended_early, malformed_claim, unsupported_request, ... (see the verifier)
    message: str = ""
    position: int | None = None  # first failing output position
    evidence: Evidence | None = None
    margin: float
    checked_tokens: int = 0
    near_ties: int = 0  # positions whose top-2 gap was under the margin (a measured blind spot)
    verifier: str = ""  # which actor / node produced it
    weights_sha256: str
    # Per-answer figures of the batch statistic for lower-precision copies (verification.calibration):
    sampler: str = ""  # "greedy" or "keyed_gumbel_v1", as re-derived from the signed request
    max_gap: float = 0.0  # the largest gap of any position (how close the answer came to the margin)
    mismatches: int = 0  # positions whose claimed id is not the verifier's exact choice (gap > 0)
    deficit: float = 0.0  # the sum of the gaps over the positions


class BatchVerdict(BaseModel):
    """The batch statistic over one miner's verified answers in a scoring cycle: a lower-precision
    copy passes each answer within the margin but misses the exact choice too often."""

    v: int = VERDICT_VERSION
    miner_hotkey: str
    ok: bool
    reason: str = "batch_statistic"
    request_ids: list[str]  # the answers it was computed over
    positions: int
    mismatch_rate: float  # positions whose token was not the verifier's exact choice / positions
    threshold: float  # honest_rate + z * sqrt(honest_rate (1 - honest_rate) / positions)
    honest_rate: float
    z: float

    @property
    def message(self) -> str:
        return (f"{self.mismatch_rate:.4f} of {self.positions} positions over {len(self.request_ids)} answers missed "
                f"the model's exact choice; honest hardware stays under {self.threshold:.4f} (p0 {self.honest_rate:g}, "
                f"z {self.z:g}): a lower-precision or otherwise different copy of the model")
