"""The claim binding: do the bytes of one collected answer belong together?

A claim holds a client's request envelope (and maybe its signature), the request and response
bodies, and the receipt the job signed and the miner counter-signed. They bind together when

- the envelope is a canonical :class:`RequestEnvelope` and ``sha256(envelope)`` is the receipt's
  request id (the sampling key: were it not the client's, it would be the miner's choice);
- the envelope, the receipt and the claim name the same job, and the receipt the same miner;
- the request body is the one the client signed (the envelope's ``body_sha256``) and the one
  the receipt hashes, and the response body is the one the receipt signs;
- given a signature: the envelope's client key signed it, and (given the job's client keys) that
  key is registered for the job.

The receipt's own signatures and chain are :func:`~cluster.protocol.receipts.verify_receipt`'s
business; this is everything else. validator-core's collector, the proof checker and the
verifier all call :func:`bind_claim`, each mapping a failure to its own reason code.
"""

from __future__ import annotations

import hashlib
from typing import Collection

from pydantic import ValidationError

from cluster.errors import ReceiptInvalid
from cluster.protocol.client_envelope import RequestEnvelope
from cluster.protocol.keys import PublicKey
from cluster.protocol.receipts import ReceiptBody

ENVELOPE = "client_envelope"  # the envelope is not the client's request for this receipt
SIGNATURE = "client_signature"  # the envelope is not signed by a client key registered for the job
RECEIPT = "binding"  # the receipt names other bodies, another job or another miner than the claim


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bind_claim(envelope: bytes, receipt: ReceiptBody, *, request_body: bytes, response_body: bytes, job_id: str,
               miner_hotkey: str, client_sig: str | None = None,
               client_keys: Collection[PublicKey] | None = None) -> RequestEnvelope:
    """Check that the pieces of a claim bind together (module docstring); return the parsed
    envelope or raise :class:`ReceiptInvalid` whose ``check`` is :data:`ENVELOPE`,
    :data:`SIGNATURE` or :data:`RECEIPT`. Without ``client_sig`` no signature is checked (a
    verifier trusts validator-core to have checked it)."""
    try:
        env = RequestEnvelope.model_validate_json(envelope)
    except ValidationError as exc:
        raise ReceiptInvalid(ENVELOPE, f"not a request envelope: {exc.error_count()} problems") from exc
    except ValueError as exc:
        raise ReceiptInvalid(ENVELOPE, f"not a request envelope ({type(exc).__name__})") from exc
    if env.canonical() != envelope:
        raise ReceiptInvalid(ENVELOPE, "the request envelope is not canonical")
    if _sha(envelope) != receipt.request_id:
        raise ReceiptInvalid(ENVELOPE, "the receipt's request id is not sha256 of the client's envelope "
                             "(the sampling key would be the miner's choice)")
    if not env.job_id == receipt.job_id == job_id:
        raise ReceiptInvalid(ENVELOPE, f"the client's envelope ({env.job_id}), the receipt ({receipt.job_id}) and "
                             f"the claim ({job_id}) name different jobs")
    if env.body_sha256 != _sha(request_body):
        raise ReceiptInvalid(ENVELOPE, "the request body is not the one the client signed")
    if receipt.input_sha256 != env.body_sha256:
        raise ReceiptInvalid(RECEIPT, "the receipt hashes another request body than the client signed")
    if receipt.output_sha256 != _sha(response_body):
        raise ReceiptInvalid(RECEIPT, "the response body is not the one the receipt signs")
    if receipt.miner_hotkey != miner_hotkey:
        raise ReceiptInvalid(RECEIPT, f"the receipt names miner {receipt.miner_hotkey}, the claim {miner_hotkey}")
    if client_sig is not None:
        if client_keys is not None and env.client_key not in client_keys:
            raise ReceiptInvalid(SIGNATURE, "the request was not signed by a client key registered for the job")
        if not env.client_key.verify(envelope, client_sig):
            raise ReceiptInvalid(SIGNATURE, "the client's signature over the request envelope does not verify")
    return env
