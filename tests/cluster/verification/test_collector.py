"""validator-core's collection of answers from a miner's proxy: pages
of receipts, bodies and client envelopes over real HTTP, every signature and the chain checked;
an answer the miner did not hand over is a chain gap, a changed byte a failed hash. Hostile
proxies (tests/support/receipt_proxies.py) break the page protocol or the budget: each is refused
naming the page and the problem, a gigabyte is cut off at the byte budget, and a byte every
29 s (or every 0.1 s, in headers or body) at the time budget."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace

import httpx
import pytest

from cluster.devstack.certs import make_ca
from cluster.errors import CollectionFailed
from cluster.protocol.http import tls_verify
from cluster.protocol.identity import Hotkey
from cluster.miner.proxy import JobRoute, MinerProxy
from cluster.verification.collector import Budget, Collected, GapWatch, StreamSource, pull, pull_pass
from serve_apps import RequestSigner, SigningKey
from cluster.protocol.keys import PublicKey
from serve_apps.echo import EchoApp
from tests.serve_apps.test_proxy import JOB, MINER, PREFIX, Served, echo_asgi
from tests.support.net import wait_for
from tests.support.receipt_proxies import HonestMiner, HostileProxy

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
    proxy.book._db.execute("DELETE FROM kept WHERE job_id = ? AND seq = 2", (JOB,))  # the miner hides one
    with httpx.Client(timeout=10) as http:
        got = pull(source, VALIDATOR, http)
    assert [c.receipt.body.seq for c in got.claims] == [0, 1, 3, 4]
    assert [(f.reason, f.ok) for f in got.failures] == [("chain_gap", False)]
    assert "[2]" in got.failures[0].message and got.failures[0].miner_hotkey == MINER.ss58


def test_a_changed_byte_or_a_forged_envelope_fails_with_the_reason(served):
    proxy, source, _ = served
    records = proxy.book.page(JOB, after_seq=-1, limit=10)
    db = proxy.book._db  # the miner edits what it kept
    db.execute("UPDATE kept SET response = ? WHERE job_id = ? AND seq = 1",
               (records[1]["response"].replace(b"1", b"7", 1), JOB))
    db.execute("UPDATE kept SET client_sig = ? WHERE job_id = ? AND seq = 3", ("00" * 64, JOB))
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


# --------------------------------------------------------------- hostile proxies, the budget
@pytest.fixture
def honest():
    miner = HonestMiner("//Bob//collector", "job-c1", validator=VALIDATOR.ss58)
    yield miner
    miner.stop()


@pytest.fixture
def hostile(honest):
    """``hostile(mode, **kw)``: a hostile proxy in front of the honest miner's, and its source."""
    made: list[HostileProxy] = []

    def make(mode: str, **kw) -> tuple[HostileProxy, StreamSource]:
        made.append(HostileProxy(mode, honest.url, **kw))
        return made[-1], honest.source(made[-1].url)
    yield make
    for proxy in made:
        proxy.stop()


@pytest.mark.parametrize("mode, reason, says", [
    ("list", "malformed_page", "page 1 is not a receipts page: at the top: Input should be an object, got an array"),
    ("twice", "duplicate_request_id", "page 1 repeats request id"),
    ("long", "page_too_long", "page 1 holds 4 records; 3 were asked"),
])
def test_a_page_that_breaks_the_protocol_is_refused_naming_the_page_and_the_problem(hostile, mode, reason, says):
    _, source = hostile(mode)
    with httpx.Client() as http, pytest.raises(CollectionFailed) as err:
        pull(source, VALIDATOR, http, limit=3)
    assert (err.value.reason, err.value.page) == (reason, 1) and says in err.value.message


def test_seq_that_never_advances_ends_the_pass_and_the_pages_before_it_stay(hostile):
    proxy, source = hostile("stuck")
    kept: list[Collected] = []
    with httpx.Client() as http, pytest.raises(CollectionFailed) as err:
        pull_pass(source, VALIDATOR, http, Budget(limit=3), kept.append)
    assert [[c.receipt.body.seq for c in page.claims] for page in kept] == [[0, 1, 2]] and not kept[0].failures
    assert err.value.reason == "seq_not_advancing" and err.value.page == 2
    assert err.value.message == "page 2 did not advance past seq 2 (its first record is seq 0)"
    assert proxy.pulls == 2


@pytest.mark.parametrize("mode", ["huge", "announced"])
def test_a_gigabyte_page_is_cut_off_at_the_byte_budget(hostile, mode):
    proxy, source = hostile(mode)
    with httpx.Client() as http, pytest.raises(CollectionFailed) as err:
        pull(source, VALIDATOR, http, max_bytes=2**20)
    assert err.value.reason == "over_byte_budget"
    assert ("announces 1073741824 bytes" if mode == "announced" else "went past the byte budget of 1048576") \
        in err.value.message
    wait_for(lambda: proxy.closed.is_set(), 10, "the proxy to see the collector hang up")
    assert proxy.sent < 64 * 2**20  # a few socket buffers, never the gigabyte


def test_one_byte_every_29_s_is_cut_at_the_time_budget(hostile):
    _, source = hostile("slow", interval_s=29)
    start = time.monotonic()
    with httpx.Client() as http, pytest.raises(CollectionFailed) as err:
        pull_pass(source, VALIDATOR, http, Budget(seconds=1), lambda page: None)
    assert err.value.reason == "over_time_budget" and err.value.page == 1
    assert time.monotonic() - start < 10  # the budget, not 29 s


@pytest.mark.parametrize("mode, tls", [("slow", False), ("slow_headers", False), ("slow_headers", True)])
def test_the_time_budget_bounds_the_sum_of_the_reads_not_each_read(hostile, tmp_path, mode, tls):
    """A byte every 0.1 s never lets one read wait its timeout: only the pass's deadline ends it
    (a watchdog shuts the connection down then, under TLS too)."""
    ca = make_ca(tmp_path / "ca") if tls else None
    proxy, source = hostile(mode, interval_s=0.1, tls=ca.issue(tmp_path, "proxy", ["127.0.0.1"]) if ca else None)
    start = time.monotonic()
    with httpx.Client(verify=tls_verify(ca.cert_path) if ca else True) as http, \
            pytest.raises(CollectionFailed) as err:
        pull(source, VALIDATOR, http, deadline=start + 1.5)
    took = time.monotonic() - start
    assert err.value.reason == "over_time_budget" and 1.5 <= took < 5, took
    assert proxy.sent or mode == "slow_headers"


def test_a_later_page_the_rest_of_the_budget_cannot_hold_waits_for_the_next_pass(honest):
    source = honest.source()
    with httpx.Client() as http:
        first = pull(source, VALIDATOR, http, limit=3)
        kept: list[Collected] = []
        assert pull_pass(source, VALIDATOR, http, Budget(limit=3, max_bytes=first.size + 100), kept.append) == 1
        assert [c.receipt.body.seq for c in kept[0].claims] == [0, 1, 2]  # page 2 left for the next pass
        nxt = replace(source, after_seq=kept[0].last_seq, prev=kept[0].last_body)
        assert pull_pass(nxt, VALIDATOR, http, Budget(limit=3, max_bytes=first.size + 100), kept.append) == 1
    assert [c.receipt.body.seq for c in kept[1].claims] == [3, 4] and not kept[1].failures


def test_a_receipt_kept_late_is_collected_and_a_hole_that_stays_is_a_gap(served):
    """Under load a proxy keeps seq n+1 a moment before n: a hole waits its grace (the validator's
    clock) before it is a chain gap, and the answers after it wait with it."""
    proxy, source, _ = served
    late = proxy.book.page(JOB, after_seq=-1, limit=10)[2]
    proxy.book._db.execute("DELETE FROM kept WHERE job_id = ? AND seq = 2", (JOB,))  # not kept yet
    now = {"t": 0.0}
    gaps = GapWatch(30, monotonic=lambda: now["t"])
    with httpx.Client(timeout=10) as http:
        first = pull(source, VALIDATOR, http, gaps=gaps)
        assert [c.receipt.body.seq for c in first.claims] == [0, 1] and not first.failures and first.done
        source = replace(source, after_seq=first.last_seq, prev=first.last_body)
        now["t"] = 10.0
        assert pull(source, VALIDATOR, http, gaps=gaps).claims == []  # still within the grace: nothing yet
        proxy.book.keep(JOB, late["receipt"]["body"]["request_id"], receipt=late["receipt"],
                        request=late["request"], response=late["response"], envelope=late["envelope"],
                        client_sig=late["client_sig"])  # kept late: the hole fills
        rest = pull(source, VALIDATOR, http, gaps=gaps)
    assert [c.receipt.body.seq for c in rest.claims] == [2, 3, 4] and not rest.failures


def test_a_hole_open_past_its_grace_is_a_chain_gap(served):
    proxy, source, _ = served
    proxy.book._db.execute("DELETE FROM kept WHERE job_id = ? AND seq = 2", (JOB,))  # never handed over
    now = {"t": 0.0}
    gaps = GapWatch(30, monotonic=lambda: now["t"])
    with httpx.Client(timeout=10) as http:
        waiting = pull(source, VALIDATOR, http, gaps=gaps)
        assert [c.receipt.body.seq for c in waiting.claims] == [0, 1] and not waiting.failures
        source = replace(source, after_seq=waiting.last_seq, prev=waiting.last_body)
        now["t"] = 31.0
        got = pull(source, VALIDATOR, http, gaps=gaps)
    assert [c.receipt.body.seq for c in got.claims] == [3, 4]
    assert [(f.reason, f.ok) for f in got.failures] == [("chain_gap", False)] and "[2]" in got.failures[0].message
