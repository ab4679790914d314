"""Streaming jobs through validator-core on the local stack: a client deploys the
whitelisted echo app, validator-core places it on a miner and deploys it through Serve's REST API
pinned to that miner's node, the miner's agent announces it (signed readiness), and every answer
through the miner's proxy carries a receipt the client library verifies. Then: files through the
miner, receipt pages for validators, refusals, terminate, time limit, and a dead node."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from cluster.protocol.envelope import seal
from cluster.protocol.identity import Hotkey
from cluster.protocol.messages import ReceiptsPull
from cluster.errors import Refused
from cluster.protocol.jobs import JobStatus
from serve_apps import (
    AppRefused, Receipt, ReceiptInvalid, RequestSigner, SigningKey, StreamFailed, StreamSpec, verify_receipt,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
VALIDATOR = Hotkey.from_uri("//Alice")


def serve_port(stack) -> int:
    return int(stack.state["gcs_address"].rsplit(":", 1)[1]) + 9


@pytest.fixture(scope="module")
def echo(streams, key):
    job = streams.deploy(StreamSpec(app="echo", version="1", client_keys=[key.public], max_duration_s=900))
    assert job.view.status == JobStatus.accepted and job.view.miner_hotkey
    job.wait_ready(timeout_s=120)
    yield job
    if not job.refresh().status.terminal:
        job.terminate()


def test_the_app_runs_on_the_placed_miners_node_and_is_announced_by_that_miner(stack, echo):
    from ray.util.state import list_actors

    name = next(n for n, hk in stack.miners.items() if hk == echo.view.miner_hotkey)
    node = json.loads((stack.home / name / "node.json").read_text())["node_id"]
    replicas = [a for a in list_actors(address=stack.state["dashboard_url"], filters=[("state", "=", "ALIVE")])
                if a.class_name == f"ServeReplica:{echo.job_id}:echo"]
    assert [r.node_id for r in replicas] == [node]
    assert echo.ready.job_id == echo.job_id and echo.ready.proxy_url.startswith("http://127.0.0.1:")
    assert echo.view.history[-1].status == JobStatus.streaming_ready


def test_answers_carry_receipts_the_client_library_verifies_and_chains(echo, key):
    with echo.http(key) as c:
        answers = [echo.call(key, "/echo", b'{"q": "buffered"}', client=c),
                   echo.call(key, "/echo?stream=1", b'{"q": "streamed"}' * 10, client=c),
                   echo.call(key, "/echo", b'{"q": "again"}', client=c)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert json.loads(answers[0].content) == {"echo": '{"q": "buffered"}'}
    assert answers[1].content.endswith(b"data: [DONE]\n\n")
    seqs = [a.receipt.seq for a in answers]
    assert seqs == list(range(seqs[0], seqs[0] + 3))  # sequential calls: consecutive, chained receipts
    for prev, nxt in zip(answers, answers[1:]):
        assert nxt.receipt.prev_sha256 == prev.receipt.digest()
    assert {a.receipt.miner_hotkey for a in answers} == {echo.view.miner_hotkey}


def test_a_byte_changed_on_the_way_fails_in_the_client_library_naming_the_check(echo, key):
    class Tamper(httpx.BaseTransport):  # a man in the middle between the miner and the client
        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()

        def handle_request(self, request):
            resp = self.inner.handle_request(request)
            body = bytearray(resp.read())
            body[10] ^= 1
            return httpx.Response(resp.status_code, headers=resp.headers, content=bytes(body), request=request)

    with pytest.raises(ReceiptInvalid) as err:
        with echo.http(key, inner=Tamper()) as c:
            echo.call(key, "/echo", b'{"q": "tamper me"}', client=c)
    assert err.value.check == "output_sha256" and "changed in transit" in str(err.value)


def test_refusals_unsigned_other_key_replay_and_direct_route(stack, echo, key):
    url = echo.base_url + "/echo"
    assert httpx.post(url, content=b"{}").json()["error"]["reason"] == "unsigned"
    with httpx.Client(auth=RequestSigner(SigningKey(), echo.job_id)) as stranger:
        assert stranger.post(url, content=b"{}").json()["error"]["reason"] == "unknown_client_key"
    signed = httpx.Request("POST", url, content=b"{}")
    next(RequestSigner(key, echo.job_id).auth_flow(signed))
    assert httpx.post(url, content=b"{}", headers=dict(signed.headers)).status_code == 200
    assert httpx.post(url, content=b"{}", headers=dict(signed.headers)).json()["error"]["reason"] == "replayed"
    # straight to the job's Serve route on the node's loopback proxy: the job itself refuses
    direct = f"http://127.0.0.1:{serve_port(stack)}{echo.view.route_prefix}/echo"
    r = httpx.post(direct, content=b"{}", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["reason"] == "unsigned"


def test_a_file_sent_through_the_miner_appears_in_the_jobs_volume(echo, key):
    info = echo.put_file(key, "notes.txt", b"hello volume\n")
    assert info["size"] == 13
    answer = echo.call(key, "/volume", b'{"name": "notes.txt"}')
    assert json.loads(answer.content) == {"name": "notes.txt", "content": "hello volume\n"}
    with pytest.raises(Refused) as err:
        echo.put_file(key, "..evil", b"x")
    assert err.value.reason == "bad_file_name"


def test_the_validator_pulls_pages_of_receipts_and_bodies_from_the_proxy(echo, key):
    echo.call(key, "/echo", b'{"q": "for the validator"}')
    url = f"{echo.ready.proxy_url}/jobs/{echo.job_id}/receipts"

    def pull(signer: Hotkey, after: int = -1):
        env = seal(signer, "receipts_pull", ReceiptsPull(job_id=echo.job_id, after_seq=after))
        return httpx.get(url, headers={"Authorization": f"Rayhorde {env.to_token()}"})

    page = pull(VALIDATOR).json()["receipts"]
    assert [p["receipt"]["body"]["seq"] for p in page] == list(range(len(page))) and len(page) >= 4
    import base64
    for p in page:
        r = Receipt.model_validate(p["receipt"])
        verify_receipt(r, job_id=echo.job_id, job_key=echo.ready.job_key, miner_hotkey=echo.view.miner_hotkey,
                       sent_body=base64.b64decode(p["request_b64"]), received_body=base64.b64decode(p["response_b64"]))
    assert [p["receipt"]["body"]["seq"] for p in pull(VALIDATOR, after=1).json()["receipts"]][0] == 2
    refused = pull(Hotkey.from_uri("//Dave")).json()["error"]
    assert refused["reason"] == "wrong_signer"


def test_validator_core_collects_every_answer_from_the_proxy_with_its_signatures_checked(stack, echo, key):
    """Issue 5's collection on the real path: validator-core pulls pages of receipts from the
    miner's proxy (signed receipts_pull), checks every signature and the chain, keeps claims."""
    import sqlalchemy as sa

    from cluster.validator import store as db

    answer = echo.call(key, "/echo", b'{"q": "collect me"}')
    engine = sa.create_engine(f"sqlite:///{stack.home / 'validator' / 'validator.db'}")
    deadline = time.monotonic() + 20
    row = None
    while row is None and time.monotonic() < deadline:
        with engine.connect() as conn:
            row = conn.execute(sa.select(db.stream_claims).where(
                db.stream_claims.c.request_id == answer.receipt.request_id)).first()
        time.sleep(0.5)
    assert row is not None, "validator-core never collected the answer"
    assert row.state in ("pending", "unsampled") and row.seq == answer.receipt.seq
    with engine.connect() as conn:
        failed = conn.execute(sa.select(sa.func.count()).select_from(db.stream_claims).where(
            db.stream_claims.c.job_id == echo.job_id, db.stream_claims.c.state == "failed")).scalar_one()
    assert failed == 0  # an honest miner: no gap, no bad signature
    engine.dispose()


def test_deploy_refusals_name_the_reason(streams, key):
    with pytest.raises(AppRefused) as err:
        streams.deploy(StreamSpec(app="bitcoin-miner", version="1", client_keys=[key.public]))
    assert err.value.reason == "app_not_whitelisted"
    with pytest.raises(AppRefused) as err:
        streams.deploy(StreamSpec(app="echo", version="9", client_keys=[key.public]))
    assert err.value.reason == "app_not_whitelisted" and "pins '1'" in err.value.message
    with pytest.raises(Exception, match="does not take options"):
        streams.deploy(StreamSpec(app="echo", version="1", client_keys=[key.public], options={"shell": "rm -rf /"}))


def test_terminate_by_the_client_closes_the_route(streams, key):
    job = streams.deploy(StreamSpec(app="echo", version="1", client_keys=[key.public]))
    job.wait_ready(timeout_s=120)
    assert job.call(key, "/echo", b"{}").status_code == 200
    assert job.terminate().status == JobStatus.completed
    assert "terminated by the client" in job.view.history[-1].detail
    deadline = time.monotonic() + 10  # the agent drops the route at its next heartbeat (2 s)
    while time.monotonic() < deadline:
        r = job.call(key, "/echo", b"{}")
        if r.status_code == 410:
            break
        time.sleep(0.3)
    assert r.status_code == 410 and json.loads(r.content)["error"]["reason"] == "job_ended"


def test_the_time_limit_ends_the_job(streams, key):
    job = streams.deploy(StreamSpec(app="echo", version="1", client_keys=[key.public], max_duration_s=6))
    deadline = time.monotonic() + 40  # ready or not (a loaded machine), the limit ends it
    while not job.refresh().status.terminal and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job.view.status == JobStatus.completed and "time limit" in job.view.history[-1].detail


def test_a_dead_node_ends_an_open_stream_with_an_error_and_the_job_horde_failed(stack, streams, key):
    """The bound: the agent looks at its node every heartbeat interval (2 s) and closes the job's
    routes at once; the proxy's open streams look every 0.25 s; the idle timeout (10 s) is the
    backstop. So an error must reach the client within heartbeat interval + idle timeout."""
    job = streams.deploy(StreamSpec(app="echo", version="1", client_keys=[key.public], options={"chunk_delay_s": 0.2}))
    job.wait_ready(timeout_s=120)
    name = next(n for n, hk in stack.miners.items() if hk == job.view.miner_hotkey)
    node_pid = json.loads((stack.home / name / "node.json").read_text())["pid"]
    got: dict = {}

    def listen() -> None:
        with job.http(key, timeout_s=60) as c, c.stream("POST", "/echo?stream=1", content=b"z" * 64 * 500) as resp:
            try:
                for chunk in resp.iter_bytes():
                    got.setdefault("first", time.monotonic())
                    got["bytes"] = got.get("bytes", b"") + chunk
            except ReceiptInvalid as exc:  # the stream ended without a receipt
                got["error"] = exc
            got["end"] = time.monotonic()

    t = threading.Thread(target=listen)
    t.start()
    deadline = time.monotonic() + 30
    while "first" not in got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "first" in got, "the stream never started"
    killed = time.monotonic()
    os.killpg(node_pid, signal.SIGKILL)  # the Ray node and its workers (the app's replica among them)
    t.join(60)
    bound_s = 2 + 10 + 1  # heartbeat interval + idle timeout + scheduling slack
    assert not t.is_alive() and got["end"] - killed < bound_s, f"client waited {got.get('end', 0) - killed:.1f} s"
    # whichever the proxy saw first: the upstream connection breaking, or the agent closing the route
    events = [json.loads(line[6:]) for line in got["bytes"].split(b"\n") if line.startswith(b"data: {")]
    assert got["error"].check == "missing" and events and "error" in events[-1]
    assert events[-1]["error"]["reason"] in ("job_unreachable", "job_ended"), events[-1]
    deadline = time.monotonic() + 20
    while job.refresh().status != JobStatus.horde_failed and time.monotonic() < deadline:
        time.sleep(0.3)
    assert job.view.status == JobStatus.horde_failed and job.view.failure.reason == "executor_disconnected"
    assert "fabric incident" in job.view.failure.message
    with pytest.raises(StreamFailed):
        job.wait_ready(timeout_s=1)
    _wait_miners_back(stack)


def _wait_miners_back(stack, timeout_s: float = 90) -> None:
    """The agent restarts its node; later tests need both miners again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        miners = httpx.get(f"{stack.validator_url}/v1/status").json()["miners"]
        if sum(1 for m in miners if m["node_id"]) == 2:
            return
        time.sleep(0.5)
    raise AssertionError("the miner's node did not rejoin")
