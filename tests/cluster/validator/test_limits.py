"""What one client can put on validator-core (validator/limits.py, app.py): numbers checked at
the door, bodies refused before they are read, long-polls that hold no thread, heartbeats on a
path of their own, rate limits on the unsigned doors, and no charge for heartbeats validator-core
could not hear (restarts, stalls).

Real sr25519 keys, validator-core's real app over uvicorn on 127.0.0.1 where load matters, the
harness of test_validator_service otherwise."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from cluster.chain.local import LocalChain
from cluster.miner.serving import BackgroundServer
from cluster.protocol.canonical import NS
from cluster.protocol.envelope import seal
from cluster.protocol.messages import CapabilityRequest, ChallengeRequest, Heartbeat, JoinRequest
from cluster.protocol.version import local_versions
from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.app import build_app
from cluster.validator.core import ValidatorCore
from cluster.validator.ledger import UNREACHABLE
from cluster.validator.limits import RateLimit, Uptime
from tests.cluster.validator.test_validator_service import ALICE, BOB, CHARLIE, CLASS, DAVE, REPO, Harness
from tests.support.net import CountingReads, free_port, rss_bytes, send_body

HUGE_INT = 10**30


def bearer(cap_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {cap_token}"}


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    harness = Harness(tmp_path, f"sqlite:///{tmp_path / 'validator.db'}")
    yield harness
    for core in harness.cores:
        core.engine.dispose()


def token_for(h: Harness) -> str:
    req = CapabilityRequest(validator=ALICE.ss58, max_jobs=100, ttl_s=3600)
    return h.core.capabilities.issue(h.seal(DAVE, "capability_request", req))


def assert_422(resp: httpx.Response, what: str) -> None:
    assert resp.status_code == 422, f"{what}: {resp.status_code} {resp.text[:300]}"
    err = resp.json()["error"]
    assert err["reason"] in ("malformed", "invalid_spec") and err["message"], what


# ---------------------------------------------------------------------------- numbers at the door
def test_non_finite_negative_and_huge_numbers_get_422_at_once(h):
    h.admit(BOB)
    token = token_for(h)
    job = h.submit(h.core.capabilities.check(token))
    spec = {"image": "rayhorde/busybox:local", "command": ["true"], "executor_class": CLASS}
    bad_numbers = ["NaN", "Infinity", "-Infinity", "-1", "1e400", str(HUGE_INT)]
    with TestClient(build_app(h.core)) as c:
        for bad in bad_numbers:
            started = time.monotonic()
            for path in (f"/v1/jobs/{job.job_id}", f"/v1/streams/{job.job_id}"):
                assert_422(c.get(f"{path}?wait_s={bad}", headers=bearer(token)), f"{path} wait_s={bad}")
            raw = '{"known": {"%s": null}, "wait_s": %s}' % (job.job_id, bad)
            assert_422(c.post("/v1/jobs/watch", content=raw, headers={**bearer(token), "content-type":
                                                                         "application/json"}), f"watch {bad}")
            for field in ("execution_timeout_s", "max_wait_s", "download_timeout_s", "upload_timeout_s",
                          "image_pull_timeout_s", "v"):
                raw = json.dumps(spec)[:-1] + f', "{field}": {bad}}}'
                assert_422(c.post("/v1/jobs", content=raw, headers={**bearer(token), "content-type":
                                                                     "application/json"}), f"{field}={bad}")
            stream = ('{"app": "echo", "version": "1", "client_keys": [{"scheme": "ed25519", "public": "%s"}], '
                      '"max_duration_s": %s}' % ("ab" * 32, bad))
            assert_422(c.post("/v1/streams", content=stream, headers={**bearer(token), "content-type":
                                                                        "application/json"}), f"stream {bad}")
            assert time.monotonic() - started < 5  # at once: nothing waited on a bad number
        for query in ("cycle=-1", f"cycle={HUGE_INT}", "closed=-1", "closed=1000", "closed=NaN"):
            assert_422(c.get(f"/v1/scores?{query}"), query)
        option = ('{"app": "echo", "version": "1", "client_keys": [{"scheme": "ed25519", "public": "%s"}], '
                  '"options": {"temperature": NaN}}' % ("ab" * 32))
        assert_422(c.post("/v1/streams", content=option, headers={**bearer(token), "content-type":
                                                                    "application/json"}), "option NaN")
        # signed payloads are checked the same way, after their signature
        req = CapabilityRequest.model_construct(validator=ALICE.ss58, max_jobs=1, ttl_s=HUGE_INT)
        assert_422(c.post("/v1/capabilities", json=seal(DAVE, "capability_request", req, clock=h.clock)
                          .model_dump(mode="json")), "capability ttl_s")
        ch = h.core.admission.challenge(ChallengeRequest(miner_hotkey=CHARLIE.ss58))
        join = JoinRequest.model_construct(validator=ALICE.ss58, challenge=ch.nonce, proxy_url="",
                                           executor_classes={CLASS: HUGE_INT}, versions=local_versions())
        assert_422(c.post("/v1/admission/join", json=seal(CHARLIE, "admission_join", join, clock=h.clock)
                          .model_dump(mode="json")), "join executors")


# ---------------------------------------------------------------------------- bodies
@pytest.mark.integration
def test_a_1_gb_body_is_refused_after_at_most_1_mb_read(h):
    token = token_for(h)
    counted = CountingReads(build_app(h.core))
    port = free_port()
    server = BackgroundServer(counted, name="validator-core", host="127.0.0.1", port=port)
    server.start()
    try:
        before = rss_bytes()
        status, _ = send_body(port, "/v1/heartbeat", 2**30, chunked=False)
        assert status == 413 and counted.read == 0  # the declared length alone refuses it
        status, sent = send_body(port, "/v1/heartbeat", 2**30, chunked=True)  # no length: counted as it comes
        assert status == 413 and counted.read <= 10**6, counted.read
        assert sent < 2**30 / 4, sent  # it stopped long before the gigabyte
        counted.read = 0
        status, _ = send_body(port, "/v1/jobs", 2**30, chunked=True)  # a spec may be large: only a user's is read
        assert status == 401 and counted.read == 0
        status, _ = send_body(port, "/v1/jobs", 2**30, chunked=True, headers=f"Authorization: Bearer {token}\r\n")
        assert status == 413 and counted.read <= h.settings.max_spec_bytes + 2**18, counted.read
        assert rss_bytes() - before < 64 * 2**20  # memory flat: nothing was kept
    finally:
        server.stop()


# ---------------------------------------------------------------------------- long-polls and heartbeats
LONG_POLLS = """
import asyncio, json, sys
import httpx

async def main(port, plan):
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as c:
        async def poll(kind, token, job, wait):
            resp = await c.get(f"/v1/jobs/{job}?wait_s={wait}", headers={"Authorization": f"Bearer {token}"})
            return kind, resp.status_code
        return await asyncio.gather(*(poll(*p) for p in plan))

print(json.dumps(asyncio.run(main(int(sys.argv[1]), json.load(sys.stdin)))))
"""


@pytest.mark.integration
@pytest.mark.slow
def test_hostile_long_polls_leave_heartbeats_answered_within_a_second(tmp_path: Path):
    """100 hostile long-polls (bad numbers, too many per capability) beside 100 honest ones held
    open: the miners' heartbeats keep answering within a second, so the sweeper (running, with a
    2 s heartbeat timeout) retires nothing and records no miner_unreachable incident."""
    shutil.copy(REPO / "configs" / "metagraph.local.json", tmp_path / "metagraph.json")
    settings = ValidatorSettings(home=tmp_path, wallet_path=tmp_path, db_url=f"sqlite:///{tmp_path / 'v.db'}",
                                 users=[DAVE.ss58], metagraph_path=tmp_path / "metagraph.json",
                                 executor_classes_path=REPO / "configs" / "executor_classes.toml",
                                 heartbeat_timeout_s=2, ticket_ttl_s=600)
    core = ValidatorCore(settings, hotkey=ALICE, chain=LocalChain(settings.metagraph_path), ray_token="t",
                         clock=time.time_ns)
    harness = Harness.__new__(Harness)  # the harness's helpers on this real-time core
    harness.clock, harness.settings, harness.cores, harness.core = time.time_ns, settings, [core], core
    for miner in (BOB, CHARLIE):
        harness.admit(miner, executors=50)
    tokens = [token_for(harness) for _ in range(26)]
    caps = [core.capabilities.check(t) for t in tokens]
    jobs = [harness.submit(caps[i % 25]).job_id for i in range(25)]  # ticketed to the miners, never fetched
    port = free_port()
    server = BackgroundServer(build_app(core), name="validator-core", host="127.0.0.1", port=port)
    server.start()
    core.start()  # the sweeper runs: a heartbeat late past the 2 s timeout would retire tickets
    beats: list[float] = []
    stop = threading.Event()

    def heartbeats() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            while not stop.is_set():
                for miner in (BOB, CHARLIE):
                    env = seal(miner, "heartbeat", Heartbeat())
                    t0 = time.monotonic()
                    assert c.post("/v1/heartbeat", json=env.model_dump(mode="json")).status_code == 200
                    beats.append(time.monotonic() - t0)
                time.sleep(0.5)

    def load() -> list[tuple[str, int]]:
        """The 200 long-polls from another process (they are other hosts' clients): their own
        parsing does not compete with the server for this process's interpreter."""
        plan = [("honest", tokens[i % 25], jobs[i % 25], "6") for i in range(100)]
        plan += [("hostile_number", tokens[25], jobs[0], bad) for bad in ["NaN", "inf", "-1", "1e9", "1e400"] * 10]
        plan += [("hostile_crowd", tokens[25], jobs[0], "30") for _ in range(50)]
        out = subprocess.run([sys.executable, "-c", LONG_POLLS, str(port)], input=json.dumps(plan),
                             capture_output=True, text=True, timeout=120, check=True)
        return [tuple(r) for r in json.loads(out.stdout)]

    beater = threading.Thread(target=heartbeats, daemon=True)
    beater.start()
    try:
        started = time.monotonic()
        results = load()
        took = time.monotonic() - started
    finally:
        stop.set()
        beater.join(10)
        core.stop()
        server.stop()
    assert sorted(s for k, s in results if k == "honest") == [200] * 100
    assert {s for k, s in results if k == "hostile_number"} == {422}
    crowd = sorted(s for k, s in results if k == "hostile_crowd")
    assert crowd.count(200) == settings.long_polls_per_capability and set(crowd) == {200, 429}
    assert took < 40  # the held polls returned after their 6 s (or the crowd's 30 s), nothing hung
    print(f"heartbeats: {len(beats)}, slowest {max(beats):.3f} s")
    assert len(beats) >= 10 and max(beats) < 1.0, beats
    with core.engine.connect() as conn:
        reasons = [r.reason for r in conn.execute(sa.select(db.incidents))]
        active = conn.execute(sa.select(sa.func.count()).select_from(db.tickets)
                              .where(db.tickets.c.active.is_(True))).scalar_one()
    assert UNREACHABLE not in reasons and active == 25, (reasons, active)
    core.engine.dispose()


def test_a_validator_core_restart_charges_no_miner(h):
    h.admit(BOB)
    cap = h.capability()
    job = h.submit(cap)
    h.fetch(BOB, job.ticket.ticket_id)
    h.clock.advance(120)  # validator-core was down two minutes: Bob's heartbeats went unheard
    core = h.restart()
    core.sweep()
    assert h.incidents() == [] and core.organic.get(cap, job.job_id).ticket.attempt == 1
    h.clock.advance(h.settings.heartbeat_timeout_s + 1)  # now serving, and Bob stays silent: that counts
    core.sweep()
    assert [(m, r) for m, _, r, _ in h.incidents()] == [(BOB.ss58, UNREACHABLE)]


def test_a_stall_starts_a_new_serving_period():
    clock = {"ns": 10 * NS, "mono": 100.0}
    up = Uptime(lambda: clock["ns"], stall_s=2, monotonic=lambda: clock["mono"])
    assert up.since_ns == 10 * NS
    clock.update(ns=11 * NS, mono=101.0)
    up.tick()
    assert up.since_ns == 10 * NS and up.stalls == 0  # on time
    clock.update(ns=20 * NS, mono=110.0)
    up.tick()  # nine seconds without a tick: heartbeats sent meanwhile were not heard
    assert up.since_ns == 20 * NS and up.stalls == 1


# ---------------------------------------------------------------------------- unsigned doors
def test_challenges_are_rate_limited_per_address_and_pruned(h):
    with TestClient(build_app(h.core)) as c:
        answers = [c.post("/v1/admission/challenge", json={"miner_hotkey": BOB.ss58})
                   for _ in range(h.settings.public_burst + 5)]
    codes = [a.status_code for a in answers]
    assert codes[:8] == [200] * 8  # then a hotkey holds no more open challenges...
    assert set(codes[8:]) == {429}
    assert answers[8].json()["error"]["reason"] == "too_many_challenges"
    last = answers[-1]  # ...and past the burst, the address is rate-limited
    assert last.json()["error"]["reason"] == "rate_limited" and int(last.headers["Retry-After"]) >= 1
    h.clock.advance(2 * h.settings.challenge_ttl_s + 1)
    h.core.admission.challenge(ChallengeRequest(miner_hotkey=CHARLIE.ss58))
    with h.core.engine.connect() as conn:  # the expired ones went with the new one
        assert conn.execute(sa.select(sa.func.count()).select_from(db.challenges)).scalar_one() == 1


def test_rate_limit_refills_and_forgets_old_addresses():
    now = {"t": 0.0}
    limit = RateLimit(2, 3, max_keys=2, monotonic=lambda: now["t"])
    for _ in range(3):
        limit.take("a", "x")
    with pytest.raises(Exception) as err:
        limit.take("a", "x")
    assert err.value.status_code == 429 and math.isclose(err.value.retry_after_s, 0.5)
    now["t"] = 0.5
    limit.take("a", "x")  # one token back after 1/rate s
    limit.take("b", "x")
    limit.take("c", "x")
    assert len(limit._buckets) == 2  # bounded: "a" was forgotten
