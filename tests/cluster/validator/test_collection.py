"""validator-core's collection pass against hostile proxies (issue 13): in ONE pass the honest
miner's stream is collected with every signature checked, and each hostile miner (a list for a
page, seq that never advances, a gigabyte, one byte every 29 s, a request id collected before)
gets one charged ``collection_failed`` incident naming the problem, its good pages kept; its
stream is not pulled again while that lasts, and its streaming work of the cycle is void."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from cluster.protocol.identity import Hotkey
from cluster.protocol.jobs import JobStatus
from cluster.protocol.streams import StreamSpec
from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.ledger import CHARGED, COLLECTION_FAILED, Ledger
from cluster.validator.scoring import score_window
from cluster.validator.verification import VerificationDesk
from tests.support.receipt_proxies import HonestMiner, HostileProxy

pytestmark = pytest.mark.integration
VALIDATOR = Hotkey.from_uri("//Alice")
BUDGET_S = 2.0
HOSTILE = {  # mode -> the incident's reason and what its message says
    "list": ("malformed_page", "page 1 is not a receipts page: at the top: Input should be an object, got an array"),
    "stuck": ("seq_not_advancing", "page 2 did not advance past seq 2"),
    "huge": ("over_byte_budget", "page 1 went past the byte budget of 4194304 bytes"),
    "slow": ("over_time_budget", "page 1 was not over when the time budget ran out"),
    "reused": ("duplicate_request_id", "page 2 repeats request id"),
}


@pytest.fixture
def miners():
    honest = HonestMiner("//Bob", "job-honest", validator=VALIDATOR.ss58)
    hostile = {}
    try:
        for mode in HOSTILE:
            miner = HonestMiner(f"//Bob//{mode}", f"job-{mode}", validator=VALIDATOR.ss58)
            hostile[mode] = (miner, HostileProxy(mode, miner.url, interval_s=29))
        yield honest, hostile
    finally:
        honest.stop()
        for miner, proxy in hostile.values():
            proxy.stop()
            miner.stop()


def _desk(db_url: str, tmp_path, streams: list[tuple[HonestMiner, str]]) -> VerificationDesk:
    settings = ValidatorSettings(home=tmp_path, collect_budget_s=BUDGET_S, collect_max_bytes=4 * 2**20,
                                 collect_page_limit=3, collect_workers=8)
    engine = db.open_engine(db_url)
    with engine.begin() as conn:
        for miner, proxy_url in streams:
            spec = StreamSpec(app="echo", version="1", client_keys=[miner.client.public])
            conn.execute(db.streams.insert().values(
                id=miner.job_id, capability_id="cap", user_hotkey="user", spec=spec.model_dump(mode="json"),
                executor_class="always_on.test", status=JobStatus.streaming_ready.value, created_ns=0,
                miner_hotkey=miner.hotkey.ss58, ready_envelope=miner.readiness(proxy_url), receipts_seq=-1))
    return VerificationDesk(settings, hotkey=VALIDATOR, engine=engine, ledger=Ledger(time.time_ns, max_attempts=3),
                            scoring=None, clock=time.time_ns)


def test_one_pass_collects_the_honest_stream_and_charges_each_hostile_miner(miners, db_url, tmp_path):
    honest, hostile = miners
    desk = _desk(db_url, tmp_path, [(honest, honest.url)] + [(m, p.url) for m, p in hostile.values()])
    start = time.monotonic()
    desk.collect()
    took = time.monotonic() - start
    assert took < BUDGET_S + 10  # the slow proxy's one byte every 29 s stopped at the budget, the others beside it

    with desk.engine.connect() as conn:
        claims = conn.execute(sa.select(db.stream_claims.c.job_id, db.stream_claims.c.seq, db.stream_claims.c.state)
                              .order_by(db.stream_claims.c.job_id, db.stream_claims.c.seq)).all()
        cursors = dict(conn.execute(sa.select(db.streams.c.id, db.streams.c.receipts_seq)).all())
        incidents = conn.execute(sa.select(db.incidents)).all()
    by_job: dict[str, list] = {}
    for job_id, seq, state in claims:
        by_job.setdefault(job_id, []).append((seq, state))
    # the honest stream: every answer collected, every signature and the chain checked (an echo
    # answer is not one the verifiers re-score: "unsampled"), no failure, no incident
    assert by_job.pop("job-honest") == [(seq, "unsampled") for seq in range(5)] and cursors["job-honest"] == 4
    # the pages before the bad one stay collected; nothing of a bad page is kept
    assert by_job == {"job-stuck": [(s, "unsampled") for s in range(3)],
                      "job-reused": [(s, "unsampled") for s in range(3)]}
    assert {job: seq for job, seq in cursors.items() if job != "job-honest"} == {
        "job-list": -1, "job-stuck": 2, "job-huge": -1, "job-slow": -1, "job-reused": 2}

    assert len(incidents) == len(HOSTILE)
    for mode, (reason, says) in HOSTILE.items():
        miner, _ = hostile[mode]
        [i] = [i for i in incidents if i.miner_hotkey == miner.hotkey.ss58]
        evidence = json.loads(i.evidence)
        assert (i.reason, i.kind, i.job_id, evidence["reason"]) == (COLLECTION_FAILED, CHARGED, miner.job_id, reason)
        assert says in evidence["message"], (mode, evidence)
    assert hostile["huge"][1].sent < 1 * 2**30

    now = time.time_ns()
    with desk.engine.connect() as conn:
        scores = score_window(conn, now - 3600 * 10**9, now + 1, now)
    assert {h for h, m in scores.items() if m.stream_voided} == {m.hotkey.ss58 for m, _ in hostile.values()}
    assert all(scores[m.hotkey.ss58].collection_failures == 1 for m, _ in hostile.values())

    # the next pass: the hostile streams wait out their penalty, the honest one has nothing new
    pulls = {mode: proxy.pulls for mode, (_, proxy) in hostile.items()}
    assert desk.collect() == 0
    assert {mode: proxy.pulls for mode, (_, proxy) in hostile.items()} == pulls
    with desk.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.incidents)).scalar() == len(HOSTILE)
