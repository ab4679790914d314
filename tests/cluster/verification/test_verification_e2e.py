"""Verification end to end on real parts: LLM answers go through a miner's real proxy;
validator-core collects and samples them (every signature and the chain checked), waits for a
batch, and hands it to its private verification cluster, whose autoscaler adds a fake ``gpu80``
worker for the verifier actor (vLLM CPU, one prefill pass per answer); the verdicts are stored,
each produced by an actor on that worker; the worker is gone again after the idle timeout.
validator-core also sends probes of its own through the proxy (a client key of its own among the
user's): they are always verified, and the user's receipts never show them.

A stack of its own (one miner) with ``verification=True``: the session stack has none."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from cluster.protocol.identity import Hotkey
from cluster.devstack.local_stack import LocalStack
from cluster.protocol.user import request_capability
from cluster.validator import store as db
from cluster.verification.cluster import CUSTOM_RESOURCE
from cluster.verification.models import Verdict
from serve_apps import SigningKey, StreamSpec, Streams
from tests.conftest import USER_URI

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BATCH = 4


def _workers(v: dict) -> list[dict]:
    req = urllib.request.Request(f"{v['dashboard_url']}/api/v0/nodes?limit=1000&detail=true",
                                 headers={"Authorization": f"Bearer {Path(v['token_path']).read_text().strip()}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        nodes = json.loads(resp.read())["data"]["result"]["result"]
    return [n for n in nodes if n.get("state") == "ALIVE" and not n["is_head_node"]
            and (n.get("resources_total") or {}).get(CUSTOM_RESOURCE, 0) > 0]


@pytest.fixture(scope="module")
def vstack(engine, tmp_path_factory):
    home = tmp_path_factory.mktemp("vstack")
    local = LocalStack(home, miners=1, executors_per_miner=1, verification=True, validator_env={
        "RAYHORDE_VALIDATOR_VERIFY_FRACTION": "1", "RAYHORDE_VALIDATOR_VERIFY_BATCH_MIN": str(BATCH),
        "RAYHORDE_VALIDATOR_VERIFY_INTERVAL_S": "1",
        "RAYHORDE_VALIDATOR_SCORE_CYCLE_S": str(10 ** 9),  # no cycle boundary inside the test
        "RAYHORDE_VALIDATOR_VERIFY_PROBE_INTERVAL_S": "10",
        "RAYHORDE_VALIDATOR_VERIFY_KEEP_WARM_S": "5"})  # batches in a row share one actor, then it exits
    state = local.up()
    try:
        yield local, state
    finally:
        local.down()


def test_sampled_answers_are_verified_on_an_autoscaled_worker_that_then_goes_away(vstack):
    local, state = vstack
    v = state["verification"]
    assert _workers(v) == []  # no verifier node before the batch
    key = SigningKey()
    cap = request_capability(state["validator_url"], Hotkey.from_uri(USER_URI), max_jobs=5, ttl_s=3600)
    streams = Streams(state["validator_url"], cap)
    job = streams.deploy(StreamSpec(app="llm", version="1", client_keys=[key.public]))
    job.wait_ready(timeout_s=600)
    llm = job.openai(key)
    model = llm.models.list().data[0].id
    for i in range(BATCH):  # greedy and keyed-sampled answers, buffered and streamed
        kwargs = dict(model=model, max_tokens=12, temperature=0 if i % 2 == 0 else 0.8,
                      messages=[{"role": "user", "content": f"Count to {i + 3}."}])
        if i < 2:
            llm.chat.completions.create(**kwargs)
        else:
            list(llm.chat.completions.create(stream=True, **kwargs))
    user_ids = {b.request_id for b in job.log.by_seq.values()}  # what this client sent (and verified)
    models_id = job.log.by_seq[min(job.log.by_seq)].request_id  # its first request: the model list
    seen_nodes: set[str] = set()
    engine = sa.create_engine(f"sqlite:///{local.home / 'validator' / 'validator.db'}")
    deadline = time.monotonic() + 600
    rows: list = []
    probed: list = []
    while time.monotonic() < deadline:
        seen_nodes |= {w["node_id"] for w in _workers(v)}
        with engine.connect() as conn:
            rows = conn.execute(sa.select(db.stream_claims).where(db.stream_claims.c.job_id == job.job_id)).all()
            probed = conn.execute(sa.select(db.probes).where(db.probes.c.job_id == job.job_id)).all()
        done = {r.request_id for r in rows if r.state in ("verified", "failed")}
        if len(done & user_ids) >= BATCH and {p.request_id for p in probed} & done:
            break
        time.sleep(0.5)
    mine = [r for r in rows if r.request_id in user_ids]
    assert len(mine) == BATCH + 1 and [r.state for r in mine if r.request_id == models_id] == ["unsampled"]
    chat = [Verdict.model_validate_json(r.verdict) for r in mine if r.verdict]
    assert len(chat) == BATCH and all(vd.ok for vd in chat), [(vd.reason, vd.message) for vd in chat]
    assert all(vd.checked_tokens > 0 for vd in chat)
    assert seen_nodes, "the autoscaler never showed a verifier worker"
    nodes = {vd.verifier.rsplit("@", 1)[1] for vd in chat}
    assert nodes <= seen_nodes  # every verdict by an actor on an autoscaled worker
    # the probes: validator-core's own requests, answered through the same proxy, always verified
    answered = [p for p in probed if p.error is None]
    assert answered and not {p.request_id for p in answered} & user_ids
    probe_rows = [r for r in rows if r.request_id in {p.request_id for p in answered} and r.verdict]
    assert probe_rows and all(Verdict.model_validate_json(r.verdict).ok for r in probe_rows)
    proof = httpx.get(f"{state['validator_url']}/v1/streams/{job.job_id}/verdicts/{chat[0].request_id}/proof",
                      headers={"Authorization": f"Bearer {cap}"}, timeout=30)
    assert proof.status_code == 200 and json.loads(proof.content)["verdict"]["ok"] is True
    # the verdicts reached scoring: the running cycle counts the stream's answers and time, not voided
    scores = httpx.get(f"{state['validator_url']}/v1/scores", timeout=30).json()["current"]
    [me] = [m for m in scores["miners"] if m["hotkey"] == mine[0].miner_hotkey]
    assert me["stream_answers"] >= BATCH + 1 + len(probe_rows) and me["stream_executor_s"] > 0
    assert not me["stream_voided"] and scores["partial"] and scores["weights"] == {str(me["uid"]): 65535}
    job.terminate()  # no more probes: nothing new to verify
    streams.close()
    engine.dispose()
    idle = time.monotonic() + 150
    while _workers(v) and time.monotonic() < idle:
        time.sleep(1)
    assert _workers(v) == []  # scaled back to zero after the idle timeout
    check_proof_elsewhere(proof.content, local.home)


def check_proof_elsewhere(proof: bytes, home: Path) -> None:
    """Another process with only the model and the proof re-scores the answer
    and agrees; one edited byte and it refuses."""
    import subprocess
    import sys

    path = home / "proof.json"
    path.write_bytes(proof)
    ok = subprocess.run([sys.executable, "-m", "cluster.cli.main", "verify-proof", str(path)], capture_output=True,
                        text=True, timeout=600)
    assert ok.returncode == 0 and "re-scored with the model" in ok.stdout, ok.stdout + ok.stderr[-2000:]
    edited = bytearray(proof)
    edited[len(edited) // 3] ^= 0x01
    path.write_bytes(bytes(edited))
    bad = subprocess.run([sys.executable, "-m", "cluster.cli.main", "verify-proof", str(path)], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 1 and "proof refused" in bad.stderr
