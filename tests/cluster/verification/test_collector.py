"""validator-core's collection of answers from a miner's proxy: pages
of receipts, bodies and client envelopes over real HTTP, every signature and the chain checked;
an answer the miner did not hand over is a chain gap, a changed byte a failed hash."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from cluster.protocol.identity import Hotkey
from cluster.miner.proxy import JobRoute, MinerProxy
from cluster.verification.collector import StreamSource, pull
from serve_apps import RequestSigner, SigningKey
from cluster.protocol.keys import PublicKey
from serve_apps.echo import EchoApp
from tests.serve_apps.test_proxy import JOB, MINER, PREFIX, Served, echo_asgi

pytestmark = pytest.mark.integration
VALIDATOR = Hotkey.from_uri("//Alice")


@pytest.fixture
def served():
    client = SigningKey()
    job = Served(echo_asgi(EchoApp(JOB, MINER.ss58, [client.public.model_dump()], route_prefix=PREFIX)))
    key = PublicKey.model_validate(httpx.get(f"{job.url}{PREFIX}/-/key").json()["job_key"])
    proxy = MinerProxy(MINER, validator_hotkey=VALIDATOR.ss58)
    proxy.add_job(JobRoute(job_id=JOB, upstream=job.url, client_keys=[client.public], job_key=key))
    front = Served(proxy.app)
    with httpx.Client(base_url=front.url, auth=RequestSigner(client, JOB), timeout=10) as c:
        for i in range(5):
            assert c.post(f"{PREFIX}/echo" + ("?stream=1" if i % 2 else ""), content=b'{"i": %d}' % i).status_code == 200
    source = StreamSource(job_id=JOB, miner_hotkey=MINER.ss58, proxy_url=front.url, job_key=key,
                          client_keys=[client.public], route_prefix=PREFIX, weights_sha256=None)
    yield proxy, source, front
    front.stop()
    job.stop()


def test_every_answer_becomes_a_checked_claim_in_order_across_pages(served):
    _, source, _ = served
    with httpx.Client(timeout=10) as http:
        first = pull(source, VALIDATOR, http, limit=3)
        assert [c.receipt.body.seq for c in first.claims] == [0, 1, 2] and not first.failures and not first.done
        source.after_seq, source.prev = first.last_seq, first.last_body
        rest = pull(source, VALIDATOR, http, limit=3)
    assert [c.receipt.body.seq for c in rest.claims] == [3, 4] and not rest.failures and rest.done
    for c in first.claims + rest.claims:
        assert c.request_id == c.receipt.body.request_id == hashlib.sha256(c.envelope).hexdigest()


def test_an_answer_the_miner_did_not_hand_over_is_a_chain_gap(served):
    proxy, source, _ = served
    hidden = next(rid for rid, k in proxy.jobs[JOB].receipts.items() if k["receipt"]["body"]["seq"] == 2)
    del proxy.jobs[JOB].receipts[hidden]
    with httpx.Client(timeout=10) as http:
        got = pull(source, VALIDATOR, http)
    assert [c.receipt.body.seq for c in got.claims] == [0, 1, 3, 4]
    assert [(f.reason, f.ok) for f in got.failures] == [("chain_gap", False)]
    assert "[2]" in got.failures[0].message and got.failures[0].miner_hotkey == MINER.ss58


def test_a_changed_byte_or_a_forged_envelope_fails_with_the_reason(served):
    proxy, source, _ = served
    records = sorted(proxy.jobs[JOB].receipts.values(), key=lambda k: k["receipt"]["body"]["seq"])
    records[1]["response"] = records[1]["response"].replace(b"1", b"7", 1)
    records[3]["client_sig"] = "00" * 64
    with httpx.Client(timeout=10) as http:
        got = pull(source, VALIDATOR, http)
    assert [(f.reason, f.request_id) for f in got.failures] == [
        ("receipt_output_sha256", records[1]["receipt"]["body"]["request_id"]),
        ("client_signature", records[3]["receipt"]["body"]["request_id"])]
    assert [c.receipt.body.seq for c in got.claims] == [0, 2, 4]


def test_only_the_validator_the_miner_joined_may_pull(served):
    _, source, _ = served
    with httpx.Client(timeout=10) as http, pytest.raises(httpx.HTTPStatusError) as err:
        pull(source, Hotkey.from_uri("//Dave"), http)
    assert err.value.response.json()["error"]["reason"] == "wrong_signer"
