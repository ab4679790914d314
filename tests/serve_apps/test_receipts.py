"""Streaming wire formats over real HTTP: a client signs each request with the httpx auth hook;
a server (standing in for the job + miner proxy pair) checks the envelope and answers with a
receipt signed by the job key and counter-signed by the miner hotkey (refusals in the one error
shape); the client verifies it. Every refusal and every receipt check is named, at the
wire-format level (test_proxy.py runs the real app and proxy)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from cluster.protocol.identity import Hotkey, offset_clock
from serve_apps import (
    RECEIPT_HEADER, Receipt, ReceiptChain, ReceiptInvalid, RequestRefused, RequestSigner, SigningKey, check_request,
    job_sign, miner_countersign, sign_request, split_sse, verify_receipt,
)
from cluster.protocol.client_envelope import MemoryNonces
from cluster.protocol.http import error_body
from cluster.protocol.receipts import GENESIS, SSE_PREFIX
from tests.conftest import REPO

pytestmark = pytest.mark.integration  # real HTTP servers on 127.0.0.1

MINER = Hotkey.from_uri("//Bob")
JOB = "job-1"


class JobServer:
    """A real HTTP server doing what the job + proxy do with the envelope and the receipt."""

    def __init__(self, client_keys, *, clock_offset_s: float = 0, tamper: bool = False, sse: bool = False):
        self.job_key = SigningKey()
        self.chain = ReceiptChain()
        self.nonces = MemoryNonces(keep_s=60)
        self.clock = offset_clock(clock_offset_s)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                t_from = outer.clock()
                try:
                    env = check_request(dict(self.headers), body, method="POST", path=self.path, job_id=JOB,
                                        client_keys=client_keys, nonces=outer.nonces, max_skew_s=5,
                                        clock=outer.clock)
                except RequestRefused as exc:
                    out = json.dumps(error_body(exc.reason, exc.message)).encode()
                    self.send_response(exc.status_code)
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                    return
                answer = b'{"echo": ' + body + b"}"
                if sse:
                    answer = b"data: " + body + b"\n\ndata: [DONE]\n\n"
                rb = outer.chain.next(job_id=JOB, request_id=env.request_id, t_from=t_from, t_to=outer.clock(),
                                      input_sha256=env.body_sha256, output_sha256=_sha(answer),
                                      job_key=outer.job_key.public, miner_hotkey=MINER.ss58)
                receipt = miner_countersign(MINER, rb, job_sign(outer.job_key, rb))
                sent = bytearray(answer)
                if tamper:
                    sent[2] ^= 0x01  # one byte changed between job and client
                self.send_response(200)
                if sse:
                    sent += SSE_PREFIX + receipt.to_b64().encode() + b"\n\n"
                else:
                    self.send_header(RECEIPT_HEADER, receipt.to_b64())
                self.send_header("Content-Length", str(len(sent)))
                self.end_headers()
                self.wfile.write(bytes(sent))

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _sha(b: bytes) -> str:
    import hashlib
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def client_key():
    return SigningKey()


@pytest.fixture
def server(client_key):
    s = JobServer([client_key.public])
    yield s
    s.close()


def call(url: str, key: SigningKey, body: bytes, **kw):
    with httpx.Client(auth=RequestSigner(key, JOB, **kw)) as c:
        sent = time.time_ns()
        resp = c.post(f"{url}/v1/echo", content=body)
        return resp, sent, time.time_ns()


def test_signed_requests_get_receipts_that_verify_and_chain(server, client_key):
    prev = None
    for i in range(3):
        body = f'{{"n": {i}}}'.encode()
        resp, sent, got = call(server.url, client_key, body)
        assert resp.status_code == 200
        receipt = Receipt.from_b64(resp.headers[RECEIPT_HEADER])
        b = verify_receipt(receipt, job_id=JOB, job_key=server.job_key.public, miner_hotkey=MINER.ss58,
                           sent_body=body, received_body=resp.content, client_sent_ns=sent, client_received_ns=got,
                           prev=prev)
        assert b.seq == i and (b.prev_sha256 == GENESIS) == (i == 0)
        prev = b


def test_streamed_answer_carries_the_receipt_as_a_final_comment_line(client_key):
    s = JobServer([client_key.public], sse=True)
    try:
        resp, sent, got = call(s.url, client_key, b'"hi"')
        content, receipt = split_sse(resp.content)
        assert content == b'data: "hi"\n\ndata: [DONE]\n\n'
        verify_receipt(receipt, job_id=JOB, job_key=s.job_key.public, miner_hotkey=MINER.ss58, sent_body=b'"hi"',
                       received_body=content, client_sent_ns=sent, client_received_ns=got)
    finally:
        s.close()


def test_one_changed_byte_fails_verification_naming_the_check(client_key):
    s = JobServer([client_key.public], tamper=True)
    try:
        resp, sent, got = call(s.url, client_key, b"[1]")
        with pytest.raises(ReceiptInvalid) as err:
            verify_receipt(Receipt.from_b64(resp.headers[RECEIPT_HEADER]), job_id=JOB, job_key=s.job_key.public,
                           miner_hotkey=MINER.ss58, sent_body=b"[1]", received_body=resp.content)
        assert err.value.check == "output_sha256" and "changed in transit" in err.value.message
    finally:
        s.close()


def test_a_miner_clock_off_by_more_than_the_skew_is_refused(client_key):
    s = JobServer([client_key.public], clock_offset_s=-30)
    try:
        resp, sent, got = call(s.url, client_key, b"{}", clock=offset_clock(-30))  # client and job agree...
        with pytest.raises(ReceiptInvalid) as err:  # ...but the verifier's own clock does not
            verify_receipt(Receipt.from_b64(resp.headers[RECEIPT_HEADER]), job_id=JOB, job_key=s.job_key.public,
                           miner_hotkey=MINER.ss58, sent_body=b"{}", received_body=resp.content,
                           client_sent_ns=sent, client_received_ns=got)
        assert err.value.check == "clock" and "max skew 5 s" in err.value.message
    finally:
        s.close()


def test_forged_signatures_gap_and_wrong_binding_are_named(server, client_key):
    resp, _, _ = call(server.url, client_key, b"1")
    good = Receipt.from_b64(resp.headers[RECEIPT_HEADER])
    kw = dict(job_id=JOB, job_key=server.job_key.public, miner_hotkey=MINER.ss58, sent_body=b"1",
              received_body=resp.content)
    forged_job = good.model_copy(update={"job_sig": SigningKey().sign(good.body.canonical())})
    forged_miner = good.model_copy(update={"miner_sig": Hotkey.generate().sign(b"x")})
    cases = [
        (forged_job, kw, "job_signature"),
        (forged_miner, kw, "miner_signature"),
        (good, {**kw, "sent_body": b"2"}, "input_sha256"),
        (good, {**kw, "job_key": SigningKey().public}, "binding"),
        (good, {**kw, "miner_hotkey": Hotkey.from_uri("//Charlie").ss58}, "binding"),
    ]
    for receipt, args, check in cases:
        with pytest.raises(ReceiptInvalid) as err:
            verify_receipt(receipt, **args)
        assert err.value.check == check
    resp2, _, _ = call(server.url, client_key, b"2")
    resp3, _, _ = call(server.url, client_key, b"3")
    third = Receipt.from_b64(resp3.headers[RECEIPT_HEADER])
    with pytest.raises(ReceiptInvalid) as err:  # the miner hid the second answer
        verify_receipt(third, **{**kw, "sent_body": b"3", "received_body": resp3.content}, prev=good.body)
    assert err.value.check == "chain" and "gap or a fork" in err.value.message


def test_requests_refused_with_reasons(server, client_key):
    def post(headers: dict, body: bytes = b"{}"):
        return httpx.post(f"{server.url}/v1/echo", content=body, headers=headers)

    assert post({}).json()["error"]["reason"] == "unsigned"
    other = SigningKey()
    assert post(sign_request(other, job_id=JOB, method="POST", path="/v1/echo", body=b"{}")).json()["error"][
        "reason"] == "unknown_client_key"
    headers = sign_request(client_key, job_id=JOB, method="POST", path="/v1/echo", body=b"{}")
    forged = {**headers, "X-Rayhorde-Signature": other.sign(b"whatever")}
    assert post(forged).json()["error"]["reason"] == "invalid_signature"
    assert post(headers).status_code == 200
    assert post(headers).json()["error"]["reason"] == "replayed"
    skewed = sign_request(client_key, job_id=JOB, method="POST", path="/v1/echo", body=b"{}", clock=offset_clock(60))
    r = post(skewed).json()["error"]
    assert r["reason"] == "clock_skew" and "max skew 5 s" in r["message"]
    moved = sign_request(client_key, job_id=JOB, method="POST", path="/v1/echo", body=b"{}")
    assert post(moved, body=b'{"x": 1}').json()["error"]["reason"] == "body_mismatch"
    other_job = sign_request(client_key, job_id="job-2", method="POST", path="/v1/echo", body=b"{}")
    assert post(other_job).json()["error"]["reason"] == "wrong_job"


def test_the_standalone_example_verifies_a_receipt_and_rejects_an_edit(server, client_key, tmp_path):
    resp, _, _ = call(server.url, client_key, b'{"q": 1}')
    (tmp_path / "req").write_bytes(b'{"q": 1}')
    (tmp_path / "resp").write_bytes(resp.content)
    cmd = [sys.executable, str(REPO / "examples/verify_receipt.py"), resp.headers[RECEIPT_HEADER],
           str(tmp_path / "req"), str(tmp_path / "resp")]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("receipt OK: job-1 seq 0")
    (tmp_path / "resp").write_bytes(resp.content[:-1] + b" ")
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode != 0 and "output hash" in bad.stderr
