"""The public surface of ``serve_apps`` so far: streaming keys, request signing, receipts.

The Serve apps, the miner proxy and the streaming lifecycle are issue 4's remaining work; these
are the wire formats of DESIGN §6 they will use, usable today by any client or validator."""

from serve_apps._private.client_envelope import (
    REQUEST_HEADER, SIGNATURE_HEADER, RequestEnvelope, RequestRefused, RequestSigner, check_request, sign_request,
)
from serve_apps._private.keys import PublicKey, SigningKey
from serve_apps._private.whitelist import AppRefused, Whitelist, WhitelistEntry, weights_digest
from serve_apps._private.receipts import (
    RECEIPT_HEADER, Receipt, ReceiptBody, ReceiptChain, ReceiptInvalid, job_sign, miner_countersign, split_sse,
    verify_receipt,
)

__all__ = [
    "AppRefused",
    "RECEIPT_HEADER",
    "REQUEST_HEADER",
    "SIGNATURE_HEADER",
    "PublicKey",
    "Receipt",
    "ReceiptBody",
    "ReceiptChain",
    "ReceiptInvalid",
    "RequestEnvelope",
    "RequestRefused",
    "RequestSigner",
    "SigningKey",
    "check_request",
    "job_sign",
    "miner_countersign",
    "sign_request",
    "split_sse",
    "verify_receipt",
    "weights_digest",
    "Whitelist",
    "WhitelistEntry",
]
