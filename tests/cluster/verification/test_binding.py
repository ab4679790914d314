"""The claim binding (``cluster.verification.binding``), the one check the collector, the proof
checker and the verifier share: every piece of a claim must belong to the others."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from cluster.errors import ReceiptInvalid
from cluster.protocol.client_envelope import REQUEST_HEADER, SIGNATURE_HEADER, sign_request
from cluster.protocol.identity import Hotkey
from cluster.protocol.keys import SigningKey
from cluster.protocol.receipts import ReceiptBody, ReceiptChain
from cluster.verification.binding import ENVELOPE, RECEIPT, SIGNATURE, bind_claim

JOB = "job-bind"
MINER = Hotkey.from_uri("//Bob").ss58
REQUEST, RESPONSE = b'{"prompt": "hi"}', b'{"choices": []}'


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def signed():
    client = SigningKey()
    headers = sign_request(client, job_id=JOB, method="POST", path=f"/jobs/{JOB}/v1/completions", body=REQUEST)
    envelope = base64.b64decode(headers[REQUEST_HEADER])
    body = ReceiptChain().next(job_id=JOB, request_id=_sha(envelope), t_from=1, t_to=2, input_sha256=_sha(REQUEST),
                               output_sha256=_sha(RESPONSE), job_key=SigningKey().public, miner_hotkey=MINER)
    return client, envelope, headers[SIGNATURE_HEADER], body


def _bind(envelope: bytes, body: ReceiptBody, **over):
    args = dict(request_body=REQUEST, response_body=RESPONSE, job_id=JOB, miner_hotkey=MINER)
    return bind_claim(envelope, body, **{**args, **over})


def _check(envelope: bytes, body: ReceiptBody, **over) -> str:
    with pytest.raises(ReceiptInvalid) as err:
        _bind(envelope, body, **over)
    return err.value.check


def test_the_pieces_of_an_honest_claim_bind(signed):
    client, envelope, sig, body = signed
    env = _bind(envelope, body, client_sig=sig, client_keys=[client.public])
    assert env.job_id == JOB and env.client_key == client.public
    assert _bind(envelope, body).body_sha256 == _sha(REQUEST)  # without a signature: no signature check


def test_every_piece_that_does_not_belong_is_named(signed):
    client, envelope, sig, body = signed
    assert _check(envelope + b" ", body) == ENVELOPE  # not canonical
    assert _check(json.dumps(json.loads(envelope), indent=1).encode(), body) == ENVELOPE
    assert _check(b"not json", body) == ENVELOPE
    assert _check(envelope, body.model_copy(update={"request_id": "0" * 64})) == ENVELOPE  # the miner's key
    assert _check(envelope, body, job_id="another-job") == ENVELOPE
    assert _check(envelope, body.model_copy(update={"job_id": "another-job"})) == ENVELOPE
    assert _check(envelope, body, request_body=REQUEST + b" ") == ENVELOPE
    assert _check(envelope, body.model_copy(update={"input_sha256": _sha(b"other")})) == RECEIPT
    assert _check(envelope, body, response_body=RESPONSE + b" ") == RECEIPT
    assert _check(envelope, body, miner_hotkey=Hotkey.from_uri("//Eve").ss58) == RECEIPT
    assert _check(envelope, body, client_sig="00" * 64) == SIGNATURE
    assert _check(envelope, body, client_sig=sig, client_keys=[SigningKey().public]) == SIGNATURE
    assert _check(envelope, body, client_sig=SigningKey().sign(envelope), client_keys=[client.public]) == SIGNATURE
