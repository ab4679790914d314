"""Pulling answers from a miner's proxy and checking everything that can be checked without the
model. Every streaming answer carries a receipt signed by the job key and counter-signed by the
miner, and receipts are chained per job so that a miner cannot hide an answer: a gap or a fork
in the chain counts as a failed verification.

For one streaming job, :func:`pull` asks the miner's proxy for the receipts after the last one
collected (a ``receipts_pull`` envelope signed by the validator hotkey) and checks, in ``seq``
order, each item's

- receipt: job-key signature, miner counter-signature (the keys from the miner-signed
  readiness), both hashes against the bytes handed over, and the chain: ``seq`` must follow the
  previous one with ``prev_sha256`` = its digest. A missing seq is an answer the miner did not
  hand over: ``chain_gap``, a failed verification, never silently skipped;
- client envelope: canonical, signed by a key registered for the job, for this job, with the
  request body's hash, and ``sha256(envelope)`` = the receipt's request id (the sampling key):
  :func:`~cluster.verification.binding.bind_claim`.

Items that pass become :class:`Claim` s (the verifier scores the model's side); items that fail
become failed :class:`Verdict` s with the reason. Nothing here trusts the miner's JSON beyond
what the signatures bind.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import httpx
from pydantic import ValidationError

from cluster.errors import ClaimRejected, ReceiptInvalid
from cluster.protocol.envelope import seal
from cluster.protocol.identity import Hotkey
from cluster.protocol.messages import ReceiptsPull
from cluster.protocol.keys import PublicKey
from cluster.protocol.receipts import Receipt, ReceiptBody, verify_receipt
from cluster.verification.binding import RECEIPT, bind_claim
from cluster.verification.models import Claim, Verdict


@dataclass
class StreamSource:
    """One job's collection state: who serves it, its keys, and where collection stopped."""

    job_id: str
    miner_hotkey: str
    proxy_url: str
    job_key: PublicKey
    client_keys: list[PublicKey]
    route_prefix: str
    weights_sha256: str | None
    after_seq: int = -1
    prev: ReceiptBody | None = None  # the receipt body at ``after_seq`` (None before the first)


@dataclass
class Collected:
    claims: list[Claim] = field(default_factory=list)
    failures: list[Verdict] = field(default_factory=list)
    last_seq: int = -1
    last_body: ReceiptBody | None = None
    done: bool = True  # False: the proxy has more pages


def pull(source: StreamSource, validator: Hotkey, http: httpx.Client, *, limit: int = 100) -> Collected:
    """One page of ``source``'s receipts, checked. Raises ``httpx.HTTPError`` if the proxy does not
    answer (the caller retries later: nothing is lost, the cursor did not move)."""
    env = seal(validator, "receipts_pull", ReceiptsPull(job_id=source.job_id, after_seq=source.after_seq, limit=limit))
    resp = http.get(f"{source.proxy_url.rstrip('/')}/jobs/{source.job_id}/receipts",
                    params={"after_seq": source.after_seq, "limit": limit},
                    headers={"Authorization": f"Rayhorde {env.to_token()}"})
    resp.raise_for_status()
    items = resp.json().get("receipts", [])
    out = Collected(last_seq=source.after_seq, last_body=source.prev, done=len(items) < limit)
    for item in items:
        try:
            receipt = Receipt.model_validate(item["receipt"])
        except (KeyError, ValidationError) as exc:
            out.failures.append(_failed(source, "", "malformed_receipt", f"not a receipt: {exc}"))
            continue
        body = receipt.body
        if body.seq <= out.last_seq:
            continue  # a page overlapping what we hold: already checked
        if body.seq != out.last_seq + 1:
            missing = list(range(out.last_seq + 1, body.seq))
            out.failures.append(_failed(source, body.request_id, "chain_gap",
                                        f"receipts {missing} of job {source.job_id} were not handed over "
                                        f"(got seq {body.seq} after {out.last_seq})"))
            out.last_body = None  # the chain restarts here: nothing to link this receipt to
        try:
            claim = _check(source, receipt, item, prev=out.last_body)
        except ReceiptInvalid as exc:
            out.failures.append(_failed(source, body.request_id, "chain_gap" if exc.check == "chain" else
                                        f"receipt_{exc.check}", exc.message))
        except ClaimRejected as exc:
            out.failures.append(_failed(source, body.request_id, exc.reason, exc.message))
        else:
            out.claims.append(claim)
        out.last_seq, out.last_body = body.seq, body
    return out


def _check(source: StreamSource, receipt: Receipt, item: dict, *, prev: ReceiptBody | None) -> Claim:
    try:
        request = base64.b64decode(item["request_b64"], validate=True)
        response = base64.b64decode(item["response_b64"], validate=True)
        envelope = base64.b64decode(item["envelope_b64"], validate=True)
        client_sig = str(item["client_sig"])
    except (KeyError, ValueError) as exc:
        raise ClaimRejected("malformed_record", f"the proxy's record lacks the bodies or the envelope: {exc!r}") from exc
    verify_receipt(receipt, job_id=source.job_id, job_key=source.job_key, miner_hotkey=source.miner_hotkey,
                   sent_body=request, received_body=response, prev=prev)
    try:
        bind_claim(envelope, receipt.body, request_body=request, response_body=response, job_id=source.job_id,
                   miner_hotkey=source.miner_hotkey, client_sig=client_sig, client_keys=source.client_keys)
    except ReceiptInvalid as exc:  # the envelope's checks keep their own reasons
        raise ClaimRejected(f"receipt_{exc.check}" if exc.check == RECEIPT else exc.check, exc.message) from exc
    return Claim(job_id=source.job_id, miner_hotkey=source.miner_hotkey,
                 weights_sha256=source.weights_sha256 or "0" * 64, route_prefix=source.route_prefix,
                 envelope=envelope, client_sig=client_sig, request_body=request, response_body=response,
                 receipt=receipt)


def _failed(source: StreamSource, request_id: str, reason: str, message: str) -> Verdict:
    return Verdict(request_id=request_id or f"{source.job_id}:unknown", job_id=source.job_id,
                   miner_hotkey=source.miner_hotkey, ok=False, reason=reason, message=message, margin=0.0,
                   verifier="validator-core", weights_sha256=source.weights_sha256 or "0" * 64)
