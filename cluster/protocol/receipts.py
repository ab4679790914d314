"""Streaming receipts: what a client, a validator or anyone holding the bytes can check. Every
streaming answer has one, signed by the job key (announced in the miner-signed readiness
message) and counter-signed by the miner hotkey.

Wire format (version 1), every object canonical JSON (keys sorted, no spaces, UTF-8, ints):

    body     = {v, job_id, request_id, t_from, t_to, input_sha256, output_sha256,
                job_key: {scheme, public}, miner_hotkey, seq, prev_sha256}
    job_sig  = job key's signature over canonical(body)                      (hex)
    miner_sig= miner hotkey's sr25519 signature over canonical({"body": body, "job_sig": job_sig})
    receipt  = {"body": body, "job_sig": job_sig, "miner_sig": miner_sig}

``t_from`` / ``t_to`` are Unix ns when the job received the request and finished the answer;
``input_sha256`` is over the request body exactly as received, ``output_sha256`` over the
response body exactly as sent (for SSE: every byte before the receipt line). Receipts are
chained per job: ``seq`` 0, 1, 2, ... and ``prev_sha256`` = sha256(canonical(previous body)),
64 zeros for the first, so a miner cannot hide an answer without leaving a gap.

:func:`verify_receipt` runs every check and raises :class:`ReceiptInvalid` naming the first
one that fails (``check`` is a stable code).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from pydantic import BaseModel, Field

from cluster.errors import ReceiptInvalid
from cluster.protocol.canonical import canonical_bytes
from cluster.protocol.identity import Hotkey, verify_signature
from cluster.protocol.keys import PublicKey, SigningKey
from cluster.protocol.numbers import INT64_MAX, UnixNs

RECEIPT_VERSION = 1
GENESIS = "0" * 64
RECEIPT_HEADER = "X-Rayhorde-Receipt"  # buffered answers: base64 of the receipt JSON
SSE_PREFIX = b": receipt "  # streamed answers end with ": receipt <base64>\n\n"


class ReceiptBody(BaseModel):
    v: int = RECEIPT_VERSION
    job_id: str
    request_id: str
    t_from: UnixNs = Field(description="Unix ns: the job received the request")
    t_to: UnixNs = Field(description="Unix ns: the job finished the response")
    input_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    output_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    job_key: PublicKey
    miner_hotkey: str
    seq: int = Field(ge=0, le=INT64_MAX)
    prev_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    def canonical(self) -> bytes:
        return canonical_bytes(self.model_dump(mode="json"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()


class Receipt(BaseModel):
    body: ReceiptBody
    job_sig: str
    miner_sig: str

    def to_b64(self) -> str:
        return base64.b64encode(canonical_bytes(self.model_dump(mode="json"))).decode()

    @classmethod
    def from_b64(cls, text: str) -> "Receipt":
        try:
            return cls.model_validate_json(base64.b64decode(text, validate=True))
        except Exception as exc:
            raise ReceiptInvalid("malformed", f"not a rayhorde receipt ({type(exc).__name__})") from exc


def miner_payload(body: ReceiptBody, job_sig: str) -> bytes:
    return canonical_bytes({"body": body.model_dump(mode="json"), "job_sig": job_sig})


def job_sign(job_key: SigningKey, body: ReceiptBody) -> str:
    """The job's half, made inside the job (its key never leaves the Serve replica)."""
    return job_key.sign(body.canonical())


def miner_countersign(miner: Hotkey, body: ReceiptBody, job_sig: str) -> Receipt:
    """The miner proxy's half: binds the answer to the miner's hotkey."""
    return Receipt(body=body, job_sig=job_sig, miner_sig=miner.sign(miner_payload(body, job_sig)))


class ReceiptChain:
    """The job side of the chain: hands out ``seq`` and ``prev_sha256`` in order."""

    def __init__(self) -> None:
        self.seq = 0
        self.prev = GENESIS

    def next(self, **fields: Any) -> ReceiptBody:
        body = ReceiptBody(seq=self.seq, prev_sha256=self.prev, **fields)
        self.seq += 1
        self.prev = body.digest()
        return body


def verify_receipt(receipt: Receipt, *, job_id: str, job_key: PublicKey, miner_hotkey: str, sent_body: bytes,
                   received_body: bytes, client_sent_ns: int | None = None, client_received_ns: int | None = None,
                   max_skew_s: float = 5, prev: ReceiptBody | None = None) -> ReceiptBody:
    """Check ``receipt`` against what the client knows; return its body or raise :class:`ReceiptInvalid`.

    ``job_key`` and ``miner_hotkey`` come from the miner-signed readiness message (validator-core
    stores it and hands it to clients); ``prev`` is the previous receipt of the same job, if the
    caller holds it (validators check whole chains).
    """
    b = receipt.body
    if b.v != RECEIPT_VERSION:
        raise ReceiptInvalid("version", f"receipt version {b.v}; this client checks version {RECEIPT_VERSION}")
    if b.job_id != job_id:
        raise ReceiptInvalid("binding", f"receipt is for job {b.job_id}, not {job_id}")
    if b.job_key != job_key:
        raise ReceiptInvalid("binding", "receipt names a job key other than the one in the readiness message")
    if b.miner_hotkey != miner_hotkey:
        raise ReceiptInvalid("binding", f"receipt names miner {b.miner_hotkey}, readiness names {miner_hotkey}")
    if not job_key.verify(b.canonical(), receipt.job_sig):
        raise ReceiptInvalid("job_signature", "the job key's signature over the receipt body does not verify")
    if not verify_signature(miner_hotkey, miner_payload(b, receipt.job_sig), receipt.miner_sig):
        raise ReceiptInvalid("miner_signature", f"miner {miner_hotkey}'s counter-signature does not verify")
    sent = hashlib.sha256(sent_body).hexdigest()
    if b.input_sha256 != sent:
        raise ReceiptInvalid("input_sha256", f"the job hashed a different request ({b.input_sha256[:16]}...) "
                             f"than the client sent ({sent[:16]}...)")
    got = hashlib.sha256(received_body).hexdigest()
    if b.output_sha256 != got:
        raise ReceiptInvalid("output_sha256", f"the answer received ({got[:16]}...) is not the answer the job "
                             f"signed ({b.output_sha256[:16]}...): changed in transit")
    if prev is not None:
        if b.seq != prev.seq + 1 or b.prev_sha256 != prev.digest():
            raise ReceiptInvalid("chain", f"receipt seq {b.seq} does not follow seq {prev.seq} (a gap or a fork)")
    elif b.seq == 0 and b.prev_sha256 != GENESIS:
        raise ReceiptInvalid("chain", "the first receipt of a job must have prev_sha256 = 64 zeros")
    skew_ns = int(max_skew_s * 1e9)
    if b.t_from > b.t_to:
        raise ReceiptInvalid("clock", "t_from is after t_to")
    if client_sent_ns is not None and b.t_from < client_sent_ns - skew_ns:
        raise ReceiptInvalid("clock", f"t_from is {(client_sent_ns - b.t_from) / 1e9:.1f} s before the client "
                             f"sent the request; max skew {max_skew_s:g} s (the miner's clock is off)")
    if client_received_ns is not None and b.t_to > client_received_ns + skew_ns:
        raise ReceiptInvalid("clock", f"t_to is {(b.t_to - client_received_ns) / 1e9:.1f} s after the client "
                             f"received the answer; max skew {max_skew_s:g} s (the miner's clock is off)")
    return b


def split_sse(stream: bytes) -> tuple[bytes, Receipt]:
    """Split a streamed answer into (every byte before the receipt line, the receipt)."""
    idx = stream.rfind(b"\n" + SSE_PREFIX)
    start = 0 if stream.startswith(SSE_PREFIX) else idx + 1
    if idx < 0 and not stream.startswith(SSE_PREFIX):
        raise ReceiptInvalid("missing", "the stream did not end with a ': receipt <base64>' comment line")
    line = stream[start:].split(b"\n", 1)[0]
    return stream[:start], Receipt.from_b64(line[len(SSE_PREFIX):].decode().strip())


def dumps(receipt: Receipt) -> str:
    return json.dumps(receipt.model_dump(mode="json"), sort_keys=True)
