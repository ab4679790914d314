"""The public surface of ``serve_apps``: the streaming client (deploy, wait for ready, call,
verify, terminate) and the streaming wire formats that outsiders verify (keys, request signing,
receipts, the app whitelist and weights digest), usable by any client or validator.

The apps themselves live beside this module (``serve_apps.echo``, ``serve_apps.llm``)."""

from cluster.errors import AppRefused, ReceiptInvalid, RequestRefused, StreamFailed
from cluster.protocol.client_envelope import (
    REQUEST_HEADER, SIGNATURE_HEADER, RequestEnvelope, RequestSigner, check_request, sign_request,
)
from cluster.protocol.keys import PublicKey, SigningKey
from cluster.protocol.receipts import (
    RECEIPT_HEADER, Receipt, ReceiptBody, ReceiptChain, job_sign, miner_countersign, split_sse, verify_receipt,
)
from cluster.protocol.streams import StreamReady, StreamSpec, StreamView
from cluster.protocol.whitelist import Whitelist, WhitelistEntry, weights_digest
from serve_apps._private.client import Answer, StreamJob, Streams, VerifyingTransport

__all__ = [
    "Answer",
    "AppRefused",
    "StreamFailed",
    "StreamJob",
    "StreamReady",
    "StreamSpec",
    "StreamView",
    "Streams",
    "VerifyingTransport",
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
