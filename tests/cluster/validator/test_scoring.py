"""Scores and weights (validator/scoring.py) on SQLite and PostgreSQL, driven through ValidatorCore.

Organic jobs and streams run through the same service paths as in production (tickets fetched,
results signed by the miner, readiness signed by the miner, the stream terminated by its user);
time moves with the test's clock. The weights land in the local chain's log, read back as a
chain reader would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from cluster.chain.local import LocalChain
from cluster.validator import store as db
from cluster.validator.scoring import MinerScore, u16_weights
from cluster.validator.core import ValidatorCore
from cluster.verification.models import Verdict
from cluster.errors import ChainError
from cluster.protocol.jobs import JobStatus
from cluster.protocol.keys import SigningKey
from cluster.protocol.streams import StreamReady, StreamSpec
from tests.cluster.validator.test_validator_service import ALICE, BOB, CHARLIE, NS, REPO, Harness

CYCLE_S = 1000


class ScoringHarness(Harness):
    def __init__(self, tmp: Path, db_url: str) -> None:  # noqa: F811
        super().__init__(tmp, db_url)
        self.core.engine.dispose()
        self.settings = self.settings.model_copy(update={
            "deploy_streams": False, "score_cycle_s": CYCLE_S, "heartbeat_timeout_s": 10 * CYCLE_S, "weights_path": tmp / "weights.jsonl",
            "whitelist_path": REPO / "configs" / "serve_apps.toml"})
        self.chain = LocalChain(self.settings.metagraph_path, weights_path=self.settings.weights_path,
                                setter=ALICE.ss58)
        self.core = ValidatorCore(self.settings, hotkey=ALICE, chain=self.chain, ray_token="token", clock=self.clock)
        self.cores.append(self.core)
        # start 1 s into a cycle, so the test knows where the boundaries are
        self.clock.now = (self.clock.now // (CYCLE_S * NS) + 1) * CYCLE_S * NS + NS

    def organic(self, cap, work_s: float) -> str:
        """One organic job: ticketed, fetched, run for ``work_s``, completed; returns its miner."""
        sub = self.submit(cap)
        miner = {BOB.ss58: BOB, CHARLIE.ss58: CHARLIE}[sub.ticket.miner_hotkey]
        self.fetch(miner, sub.ticket.ticket_id)
        self.status(miner, sub.job_id, sub.ticket, JobStatus.accepted)
        self.clock.advance(work_s)
        self.result(miner, sub.job_id, sub.ticket)
        return miner.ss58

    def stream(self, cap) -> tuple[str, str]:
        """A streaming job placed and announced ready by its miner; returns (job id, miner)."""
        view = self.core.streams.deploy(cap, StreamSpec(app="echo", version="1", client_keys=[SigningKey().public]))
        miner = {BOB.ss58: BOB, CHARLIE.ss58: CHARLIE}[view.miner_hotkey]
        ready = StreamReady(job_id=view.job_id, job_key=SigningKey().public, proxy_url="http://127.0.0.1:1")
        self.core.streams.ready(view.job_id, self.seal(miner, "stream_ready", ready))
        return view.job_id, miner.ss58

    def uid(self, hotkey: str) -> int:
        return self.chain.metagraph(self.settings.netuid).neuron(hotkey).uid

    def end_cycle(self):
        self.clock.now = (self.clock.now // (CYCLE_S * NS) + 1) * CYCLE_S * NS + NS
        return self.core.scoring.tick()


@pytest.fixture
def h(tmp_path: Path, db_url: str):  # noqa: F811
    harness = ScoringHarness(tmp_path, db_url)
    yield harness
    for core in harness.cores:
        core.engine.dispose()


def by_hotkey(scores, hotkey):
    return next(m for m in scores.miners if m.hotkey == hotkey)


def test_a_cycle_scores_executor_seconds_and_sets_u16_weights_once(h):
    h.admit(BOB, executors=2), h.admit(CHARLIE, executors=2)
    cap = h.capability()
    organic_miner = h.organic(cap, 30)
    job_id, stream_miner = h.stream(cap)
    assert stream_miner != organic_miner  # the least-used miner got the stream
    h.clock.advance(100)
    h.core.streams.terminate(cap, job_id)
    h.clock.advance(500)  # idle: counts for nobody

    running = h.core.scoring.scores(h.core.scoring.cycle_of(h.clock.now))
    assert running.partial
    o, s = by_hotkey(running, organic_miner), by_hotkey(running, stream_miner)
    assert (o.organic_jobs, round(o.organic_executor_s), o.stream_executor_s) == (1, 30, 0)
    assert (s.organic_jobs, round(s.stream_executor_s), s.stream_voided) == (0, 100, False)
    assert [m.hotkey for m in running.miners] == [stream_miner, organic_miner]  # best first

    closed = h.end_cycle()
    assert closed is not None and not closed.partial and closed.chain_status == "set"
    expected = closed.weights
    assert expected[h.uid(stream_miner)] == 65535  # clock reads add a microsecond each: within 2 / 65535
    assert set(expected) == {h.uid(stream_miner), h.uid(organic_miner)}
    assert abs(expected[h.uid(organic_miner)] - 30 / 100 * 65535) <= 2
    on_chain = h.chain.weights(h.settings.netuid)[ALICE.ss58]
    assert on_chain.weights == expected and on_chain.setter == ALICE.ss58
    assert h.core.scoring.tick() is None  # closed once: a second sweep sets nothing more
    assert len(h.settings.weights_path.read_text().splitlines()) == 1
    [stored] = h.core.scoring.closed()
    assert stored.weights == expected and stored.chain_status == "set" and stored.cycle == closed.cycle

    # a cycle where nobody worked: nothing is set, and the record says why
    quiet = h.end_cycle()
    assert quiet.weights == {} and quiet.chain_status.startswith("skipped: no registered miner")
    assert len(h.settings.weights_path.read_text().splitlines()) == 1


def test_a_failed_verification_voids_the_cycles_streaming_work_only(h):
    h.admit(BOB, executors=2), h.admit(CHARLIE, executors=2)
    cap = h.capability()
    organic_miner = h.organic(cap, 40)
    job_id, cheat = h.stream(cap)
    h.clock.advance(200)
    verdict = Verdict(request_id="ab" * 32, job_id=job_id, miner_hotkey=cheat, ok=False, reason="not_argmax",
                      message="position 7: token 42 is 3.1 below the top choice", position=7, margin=0.625,
                      weights_sha256="0" * 64)
    h.core.verification.store_verdicts([verdict])
    h.organic(cap, 20)  # the cheat is banned from new work: this goes to the other miner too

    closed = h.end_cycle()
    c = by_hotkey(closed, cheat)
    assert c.stream_voided and c.verification_failures == 1 and round(c.stream_executor_s) > 200 and c.score == 0
    o = by_hotkey(closed, organic_miner)
    assert (o.organic_jobs, round(o.score)) == (2, 60)
    assert closed.weights == {h.uid(organic_miner): 65535}  # nothing for the cheat this cycle
    assert h.chain.weights(h.settings.netuid)[ALICE.ss58].weights == {h.uid(organic_miner): 65535}

    # the next cycle its stream (still serving) counts again; the ban is about new work
    h.clock.advance(300)
    nxt = h.end_cycle()
    c2 = by_hotkey(nxt, cheat)
    assert not c2.stream_voided and round(c2.stream_executor_s) == CYCLE_S
    assert nxt.weights == {h.uid(cheat): 65535}


def test_the_batch_statistic_fails_a_miner_whose_answers_miss_the_exact_choice_too_often(h):
    """Answers verified one by one (state ``verified``) as the verification desk stores them."""
    h.admit(BOB, executors=2), h.admit(CHARLIE, executors=2)
    cap = h.capability()
    honest_job, honest = h.stream(cap)
    copy_job, copy = h.stream(cap)
    assert honest != copy
    rate = h.settings.verify_batch_honest_rate

    def verified(job_id: str, miner: str, n: int, mismatches: int) -> None:
        with h.core.engine.begin() as conn:
            for i in range(n):
                rid = f"{job_id}-{i}"
                v = Verdict(request_id=rid, job_id=job_id, miner_hotkey=miner, ok=True, reason="ok", margin=0.625,
                            weights_sha256="0" * 64, checked_tokens=128, mismatches=mismatches)
                conn.execute(db.stream_claims.insert().values(
                    request_id=rid, job_id=job_id, seq=i, miner_hotkey=miner, collected_ns=h.clock(),
                    claim=json.dumps({"request_id": rid}), state="verified", verdict=v.model_dump_json()))

    verified(honest_job, honest, 8, mismatches=round(128 * rate))  # at the honest rate: passes
    verified(copy_job, copy, 8, mismatches=round(128 * rate * 8))  # eight times it: a different copy
    assert h.core.verification.check_batch(honest).ok
    bv = h.core.verification.check_batch(copy)
    assert not bv.ok and bv.positions == 8 * 128 and bv.mismatch_rate > bv.threshold
    assert "lower-precision" in bv.message and len(bv.request_ids) == 8
    h.core.verification.check_batch(copy)  # once per cycle
    with h.core.engine.connect() as conn:
        rows = conn.execute(sa.select(db.incidents.c.miner_hotkey, db.incidents.c.evidence)
                            .where(db.incidents.c.reason == "verification_failed")).all()
    assert [r.miner_hotkey for r in rows] == [copy]
    assert json.loads(rows[0].evidence)["reason"] == "batch_statistic"
    h.clock.advance(10)
    closed = h.end_cycle()
    assert by_hotkey(closed, copy).stream_voided and not by_hotkey(closed, honest).stream_voided
    assert closed.weights == {h.uid(honest): 65535}


def test_u16_weights_max_normalise_and_leave_out_unregistered_and_zero():
    miners = [MinerScore(hotkey="a", uid=3, score=50.0), MinerScore(hotkey="b", uid=1, score=200.0),
              MinerScore(hotkey="c", uid=None, score=900.0), MinerScore(hotkey="d", uid=2, score=0.0),
              MinerScore(hotkey="e", uid=4, score=0.001)]
    assert u16_weights(miners) == {1: 65535, 3: 16384, 4: 1}  # a tiny positive score still gets a weight
    assert u16_weights([MinerScore(hotkey="a", uid=0)]) == {}


def test_the_local_chain_refuses_unknown_uids_and_values_out_of_range(tmp_path):
    shutil.copy(REPO / "configs" / "metagraph.local.json", tmp_path / "mg.json")
    chain = LocalChain(tmp_path / "mg.json", weights_path=tmp_path / "w.jsonl", setter=ALICE.ss58)
    with pytest.raises(ChainError, match=r"uids \[99\] refused: not in subnet 12's metagraph"):
        chain.set_weights(12, {0: 1, 99: 5})
    with pytest.raises(ChainError, match=r"each must be 0..65535"):
        chain.set_weights(12, {0: 70000})
    assert not (tmp_path / "w.jsonl").exists()  # nothing half written
    chain.set_weights(12, {1: 65535})
    with open(tmp_path / "w.jsonl", "a") as f:
        f.write('{"netuid": 12, "setter": "torn')  # a crash mid-line
    assert chain.weights(12)[ALICE.ss58].weights == {1: 65535}
    with pytest.raises(NotImplementedError, match="cannot set weights"):
        LocalChain(tmp_path / "mg.json").set_weights(12, {1: 1})  # no log configured: read-only
