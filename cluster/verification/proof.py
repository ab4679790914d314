"""A self-contained proof of a verdict: anyone holding the model can check it.

    proof = canonical JSON of {v, claim, readiness, weights_sha256, margin, verdict, validator}
            + "sig": the validator hotkey's signature over the canonical JSON without "sig"

:func:`check_proof` needs nothing but the proof bytes (and the model, to re-score): the file
must be exactly canonical (any edited byte, whitespace included, fails), the validator's
signature must verify, the readiness must be the miner's signature binding the job key and the
weights digest, the receipt must carry both signatures over the two bodies, the request must be
signed by the client with ``sha256(envelope)`` = the request id (the sampling key)
(:func:`~cluster.verification.binding.bind_claim`), and re-scoring
the claim with the same model and margin must give the same verdict (reason and position).

CLI: ``rayhorde verify-proof PROOF.json [--model-dir DIR]``.
"""

from __future__ import annotations

import json
from typing import Callable

from pydantic import BaseModel, ValidationError

from cluster.protocol.canonical import canonical_bytes
from cluster.protocol.envelope import SignedEnvelope, open_envelope
from cluster.protocol.identity import Hotkey, verify_signature
from cluster.errors import ProofInvalid, ReceiptInvalid, SignatureRejected
from cluster.protocol.receipts import verify_receipt
from cluster.protocol.streams import READY_KIND, StreamReady
from cluster.verification.binding import bind_claim
from cluster.verification.models import Claim, Verdict

PROOF_VERSION = 1
Rescorer = Callable[[Claim, float], Verdict]


class Proof(BaseModel):
    v: int = PROOF_VERSION
    claim: Claim
    readiness: SignedEnvelope
    weights_sha256: str
    margin: float
    verdict: Verdict
    validator: str

    def doc(self) -> dict:
        return _floats_as_text(self.model_dump(mode="json"))

    def unsigned(self) -> bytes:
        return canonical_bytes(self.doc())


def _floats_as_text(obj):
    """Signed objects carry no floats (their text form drifts between libraries); the proof's few
    (margin, scores) travel as Python's shortest round-trip text, which reads back exactly."""
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, dict):
        return {k: _floats_as_text(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_floats_as_text(v) for v in obj]
    return obj


def make_proof(claim: Claim, readiness: SignedEnvelope, verdict: Verdict, margin: float, validator: Hotkey) -> bytes:
    proof = Proof(claim=claim, readiness=readiness, weights_sha256=verdict.weights_sha256, margin=margin,
                  verdict=verdict, validator=validator.ss58)
    return canonical_bytes({**proof.doc(), "sig": validator.sign(proof.unsigned())})


def check_proof(raw: bytes, *, rescore: Rescorer | None = None) -> Proof:
    """Check every signature and hash in ``raw``; with ``rescore``, re-run the verifier on the
    claim and require the same verdict. Returns the proof or raises :class:`ProofInvalid`."""
    try:
        doc = json.loads(raw)
        sig = doc.pop("sig")
        proof = Proof.model_validate(doc)
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise ProofInvalid("malformed", f"not a rayhorde proof: {exc}") from exc
    if canonical_bytes({**proof.doc(), "sig": sig}) != raw:
        raise ProofInvalid("canonical", "the file is not the canonical form of its content (it was edited)")
    if proof.v != PROOF_VERSION:
        raise ProofInvalid("version", f"proof version {proof.v}; this checker reads version {PROOF_VERSION}")
    if not verify_signature(proof.validator, proof.unsigned(), sig):
        raise ProofInvalid("validator_signature", f"validator {proof.validator}'s signature does not verify")
    claim, verdict = proof.claim, proof.verdict
    try:
        ready = StreamReady.model_validate(open_envelope(proof.readiness, kind=READY_KIND, max_skew_s=0,
                                                         signers=[claim.miner_hotkey], check_time=False))
    except (SignatureRejected, ValidationError) as exc:
        raise ProofInvalid("readiness", f"the readiness is not the miner's signature: {exc}") from exc
    if ready.job_id != claim.job_id or ready.weights_sha256 != proof.weights_sha256:
        raise ProofInvalid("readiness", "the readiness names another job or other weights than the proof")
    try:
        verify_receipt(claim.receipt, job_id=claim.job_id, job_key=ready.job_key, miner_hotkey=claim.miner_hotkey,
                       sent_body=claim.request_body, received_body=claim.response_body)
    except ReceiptInvalid as exc:
        raise ProofInvalid(f"receipt_{exc.check}", exc.message) from exc
    try:
        bind_claim(claim.envelope, claim.receipt.body, request_body=claim.request_body,
                   response_body=claim.response_body, job_id=claim.job_id, miner_hotkey=claim.miner_hotkey,
                   client_sig=claim.client_sig)
    except ReceiptInvalid as exc:
        raise ProofInvalid(exc.check, f"the request is not the one the client signed for this receipt: "
                           f"{exc.message}") from exc
    if verdict.request_id != claim.request_id or verdict.weights_sha256 != proof.weights_sha256:
        raise ProofInvalid("verdict", "the verdict is about another request or other weights")
    if rescore is not None:
        again = rescore(claim, proof.margin)
        if (again.ok, again.reason, again.position) != (verdict.ok, verdict.reason, verdict.position):
            raise ProofInvalid("rescore", f"re-scoring gives {again.reason} at {again.position}, the proof says "
                               f"{verdict.reason} at {verdict.position}")
    return proof


def rescorer(model_dir: str | None) -> Rescorer:
    """Re-score with the real verifier on this machine's copy of the whitelisted model."""
    def run(claim: Claim, margin: float) -> Verdict:
        from cluster.verification.verifier import Verifier

        verifier = Verifier(model_dir=model_dir) if model_dir else Verifier()
        try:
            return verifier.verify_batch([claim], margin)[0]
        finally:
            verifier.close()
    return run
