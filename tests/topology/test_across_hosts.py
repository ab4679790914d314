"""rayhorde across hosts: validator, miner1, miner2 and user as separate hosts (network
namespaces, :mod:`tests.support.topology`), each role started with its own command and config,
every door over HTTPS with a CA of the test's own. From the user host: the peer's hello world
with stock ``ray job submit``, an LLM stream through miner1's proxy with the ``openai`` client
and its verification verdict; then miner1's link is cut while it runs a job (attempt 2 on
miner2, a fabric incident) and restored (miner1 joins again and gets new work). The topology
fixture checks that nothing of it is left afterwards."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from cluster.validator import store as db
from cluster.verification.models import Verdict
from cluster.devstack.certs import make_ca
from tests.support.topo_stack import MINER_URIS, RAYHORDE, STREAM_CLASS, TopoStack
from cluster.protocol.identity import Hotkey

pytestmark = [pytest.mark.topology, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]
MINER1, MINER2 = (Hotkey.from_uri(MINER_URIS[n]).ss58 for n in ("miner1", "miner2"))


@pytest.fixture(scope="module")
def stack(topology, engine):
    s = TopoStack(topology, verification=True, validator={
        "verify_fraction": 1, "verify_batch_min": 2, "verify_batch_max_age_s": 5, "verify_interval_s": 1, "verify_probe_interval_s": 0,
        "verify_keep_warm_s": 5, "score_cycle_s": 10 ** 9})
    s.start_validator()
    s.start_miner("miner1")
    s.start_miner("miner2")
    yield s
    assert s.close() == []  # the roles stopped, their Ray temp dirs removed


@pytest.fixture(scope="module")
def cap(stack) -> str:
    return stack.user("capability", "50")["capability"]


def _rows(stack, table, *where):
    engine = stack.db()
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(table).where(*where)).all()
    finally:
        engine.dispose()


def test_llm_stream_through_miner1s_proxy_is_verified(stack, cap):
    out = stack.user("llm", cap, STREAM_CLASS, "3", timeout_s=1200)
    miner1 = stack.topo["miner1"]
    assert out["miner"] == MINER1 and out["proxy_url"] == f"https://{miner1.ip}:{31009}"
    assert len(out["texts"]) == 3 and all(out["texts"])
    user_ids = {r["request_id"] for r in out["receipts"]}
    assert len(user_ids) == 4  # the model list and three answers, each receipt verified by the client
    deadline = time.monotonic() + 900
    verdicts: list[Verdict] = []
    while time.monotonic() < deadline and len(verdicts) < 3:
        rows = _rows(stack, db.stream_claims, db.stream_claims.c.job_id == out["job_id"])
        verdicts = [Verdict.model_validate_json(r.verdict) for r in rows if r.verdict and r.request_id in user_ids]
        time.sleep(2)
    assert len(verdicts) == 3 and all(v.ok and v.checked_tokens > 0 for v in verdicts), verdicts
    assert stack.user("terminate", cap, out["job_id"])["status"] == "completed"


def test_only_admitted_miners_hosts_reach_the_heads_ray_ports(stack):
    v = stack.v
    for port in (30000, 30007):  # the GCS, the head's raylet
        assert stack.topo["miner1"].can_connect(v.ip, port) and stack.topo["miner2"].can_connect(v.ip, port)
        assert not stack.topo["user"].can_connect(v.ip, port)  # not admitted: validator-core's firewall drops it
    assert stack.topo["user"].can_connect(v.ip, 8750)  # validator-core's own door stays open


def test_hello_world_with_stock_ray_job_submit_from_the_user_host(stack, cap):
    out = stack.user("hello", cap)  # the capability is all the user holds: never the Ray token
    assert out["rc"] == 0, out
    assert "Hello, rayhorde!" in out["stdout"] and "status completed" in out["stdout"], out["stdout"]
    miner = out["stdout"].split("miner ", 1)[1].split()[0]
    assert miner in (MINER1, MINER2)


def test_another_ca_is_refused_and_miner_check_names_unreachable_ray_ports(stack, tmp_path):
    other = make_ca(tmp_path / "other", "someone else's CA")
    proxy = f"https://{stack.topo['miner1'].ip}:31009"
    refused = stack.user("untrusted", str(other.cert_path), proxy)
    assert set(refused) == {stack.validator_url, proxy}
    assert all(v.startswith("refused:") and "not trusted" in v for v in refused.values()), refused
    m2 = stack.topo["miner2"]
    check = [RAYHORDE, "miner", "check", "--config", str(m2.home / "miner.toml")]
    ok = m2.run(check, env=stack.env(m2), check=False, timeout_s=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ray_ports = [p for p in range(31003, 31060) if p not in (31005, 31006, 31009)]
    m2.block_inbound(ray_ports, from_ip=stack.v.ip)
    try:
        bad = m2.run(check, env=stack.env(m2), check=False, timeout_s=120)
    finally:
        m2.unblock_inbound()
    assert bad.returncode == 1, bad.stdout
    lines = {ln.split(":", 1)[0].strip(): ln for ln in bad.stdout.splitlines() if ":" in ln}
    assert lines["FAIL  Ray ports"].count("node manager 31007") == 1, bad.stdout
    assert lines["ok    proxy port"] and lines["ok    registration"], bad.stdout


def test_a_cut_link_moves_the_job_to_miner2_and_miner1_rejoins(stack, cap):
    m1 = stack.topo["miner1"]
    first_node = stack.node_of(MINER1)
    jobs = stack.user("submit", cap, "25", "2")["jobs"]
    assert all(jobs), jobs
    on = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(on) < 2:  # both running, one on each miner (1 executor each)
        for j in jobs:
            t = _rows(stack, db.tickets, db.tickets.c.job_id == j, db.tickets.c.active.is_(True))
            if t and t[0].fetched_ns:
                on[t[0].miner_hotkey] = j
        time.sleep(0.5)
    assert set(on) == {MINER1, MINER2}, on
    cut_ns = time.time_ns()
    m1.cut()
    try:
        job = on[MINER1]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            [row] = _rows(stack, db.jobs, db.jobs.c.id == job)
            if row.status == "completed":
                break
            time.sleep(1)
        assert row.status == "completed", (row.status, stack.log("validator"))
        tickets = _rows(stack, db.tickets, db.tickets.c.job_id == job)
        by_attempt = {t.attempt: t for t in tickets}
        assert by_attempt[1].miner_hotkey == MINER1 and by_attempt[1].retired_reason == "miner_unreachable"
        assert by_attempt[2].miner_hotkey == MINER2
        [incident] = _rows(stack, db.incidents, db.incidents.c.job_id == job)
        assert (incident.kind, incident.reason, incident.miner_hotkey) == ("fabric", "miner_unreachable", MINER1)
        time.sleep(20)  # long enough for the head to declare miner1's Ray node dead
    finally:
        m1.restore()
    stack.wait(lambda: (stack.node_of(MINER1) or first_node) != first_node, 180, "miner1 to rejoin", "miner1")
    assert _rows(stack, db.miners, db.miners.c.hotkey == MINER1)[0].admitted_ns > cut_ns  # a fresh admission
    again = stack.user("submit", cap, "1", "2")["jobs"]
    deadline = time.monotonic() + 180
    miners = set()
    while time.monotonic() < deadline and len(miners) < 2:
        miners = {t.miner_hotkey for j in again for t in _rows(stack, db.tickets, db.tickets.c.job_id == j)}
        time.sleep(0.5)
    assert MINER1 in miners, (miners, stack.log("miner1"))


def test_a_miner_removed_from_the_metagraph_is_cut_off_while_the_other_keeps_working(stack, cap):
    """Last in this module: miner2 does not come back."""
    m2 = stack.topo["miner2"]
    assert m2.can_connect(stack.v.ip, 30000)
    stack.deregister("miner2")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _rows(stack, db.miners, db.miners.c.hotkey == MINER2):
        time.sleep(0.5)
    assert not _rows(stack, db.miners, db.miners.c.hotkey == MINER2), "miner2 is still admitted"
    assert not m2.can_connect(stack.v.ip, 30000)  # its host is out of the firewall's set at once
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "not_registered" not in stack.log("miner2", tail=20000):
        time.sleep(0.5)
    assert "not_registered" in stack.log("miner2", tail=20000)  # its heartbeats (or rejoin) are refused
    jobs = stack.user("submit", cap, "1", "2")["jobs"]
    deadline = time.monotonic() + 180
    rows = []
    while time.monotonic() < deadline:
        rows = [_rows(stack, db.jobs, db.jobs.c.id == j)[0] for j in jobs]
        if all(r.status == "completed" for r in rows):
            break
        time.sleep(1)
    assert [(r.status, r.miner_hotkey) for r in rows] == [("completed", MINER1)] * 2, stack.log("validator")
