"""Routing and queueing: 100 jobs at once across two miners with two
executors each all complete, no miner ever runs more containers than its executors, and jobs
that waited say why in their history."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

from tests.conftest import IMAGE

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_hundred_jobs_at_once_respect_executor_counts(stack, engine):
    since = time.time()
    handles = [stack.submit({"image": IMAGE, "command": ["sh", "-c", f"echo {i}"], "max_wait_s": 600})
               for i in range(100)]
    queued_at_submit = sum(1 for h in handles if h.queue_reason)
    views = [h.result(timeout_s=300) for h in handles]
    until = time.time() + 1
    assert [v.status.value for v in views] == ["completed"] * 100
    assert [v.result.stdout for v in views] == [f"{i}\n" for i in range(100)]
    assert {v.miner_hotkey for v in views} == set(stack.miners.values())  # the queue overflows to both

    # replay the engine's event stream: containers started and died per agent label
    events = engine.events(since=int(since) - 1, until=until, filters={"type": "container"}, decode=True)
    running: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    for e in sorted(events, key=lambda e: e["timeNano"]):
        miner = e["Actor"]["Attributes"].get("rayhorde.agent")
        if miner is None or e["timeNano"] < since * 1e9:
            continue
        if e["status"] == "start":
            running[miner] += 1
            peak[miner] = max(peak[miner], running[miner])
        elif e["status"] == "die":
            running[miner] -= 1
    assert set(peak) == set(stack.miners.values())
    assert max(peak.values()) <= 2, f"a miner ran more containers than its 2 executors: {dict(peak)}"

    assert queued_at_submit > 50  # four executors cannot take a hundred jobs at once
    waited = [v for v in views if any(e.detail.startswith("queued: ") for e in v.history)]
    assert len(waited) == queued_at_submit
    reason = next(e.detail for e in waited[-1].history if e.detail.startswith("queued: "))
    assert "of 4 always_on.test executors free on live admitted miners;" in reason and "jobs ahead" in reason


def test_a_job_that_may_not_wait_is_rejected_when_all_executors_are_busy(stack):
    from cluster.errors import Refused

    busy = [stack.submit({"image": IMAGE, "command": ["sleep", "3"]}) for _ in range(4)]
    deadline = time.time() + 30
    while not all(h.ticket_id for h in busy) and time.time() < deadline:
        time.sleep(0.1)
    with pytest.raises(Refused) as err:
        stack.submit({"image": IMAGE, "command": ["true"], "max_wait_s": 0})
    assert err.value.reason == "no_miner_for_job"
    assert "0 of 4 always_on.test executors free" in err.value.message
    views = [h.result(timeout_s=60) for h in busy]
    assert [v.status.value for v in views] == ["completed"] * 4, [(v.failure, v.history[-1]) for v in views]
