"""Organic jobs end to end: real dockerd, real multi-node Ray, real HTTP."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import HELLO, IMAGE, container_events

pytestmark = pytest.mark.integration


def spec(command: str, **kw) -> dict:
    return {"image": IMAGE, "command": ["sh", "-c", command], **kw}


def test_hello_world_returns_the_artifact(stack):
    view = stack.run(spec(HELLO, env={"NAME": "Ada"}))
    assert view.status.value == "completed"
    assert view.artifact("/artifacts/stuff") == b"Hello, Ada!\n"
    assert view.miner_hotkey in stack.miners.values()
    assert [e.status.value for e in view.history] == ["received", "received", "accepted", "executor_ready",
                                                      "execution_done", "completed"]
    assert view.history[1].detail == f"ticket for miner {view.miner_hotkey} (attempt 1)"
    assert {e.attempt for e in view.history[2:]} == {1}


def test_five_jobs_back_to_back_all_complete(stack):
    names = [f"n{i}" for i in range(5)]
    views = [stack.run(spec(HELLO, env={"NAME": n})) for n in names]
    assert [v.status.value for v in views] == ["completed"] * 5
    assert [v.artifact("/artifacts/stuff").decode() for v in views] == [f"Hello, {n}!\n" for n in names]
    assert {v.miner_hotkey for v in views} <= set(stack.miners.values())


def test_nonzero_exit_is_a_job_failure_at_execution(stack):
    view = stack.run(spec("echo bad >&2; exit 3"))
    assert view.status.value == "failed"
    f = view.failure
    assert (f.kind.value, f.reason, f.stage, f.exit_code) == ("job_failure", "nonzero_return_code", "execution", 3)
    assert view.result.stderr == "bad\n"


def test_job_past_its_execution_limit_is_killed_and_reported_timeout(stack, engine):
    t0 = time.time()
    handle = stack.submit(spec("echo started; sleep 60", execution_timeout_s=2))
    view = handle.result(timeout_s=60)
    elapsed = time.time() - t0
    assert view.status.value == "failed"
    assert (view.failure.reason, view.failure.stage) == ("timeout", "execution")
    assert view.result.stdout == "started\n"
    assert elapsed < 30, f"a 2 s limit took {elapsed:.0f} s to enforce"  # liveness bound, not a benchmark
    assert engine.containers.list(all=True, filters={"label": f"rayhorde.job={handle.job_id}"}) == []


def test_job_beyond_its_memory_limit_is_oom_killed(stack):
    # always_on.test allows 256 MB; dd's 512 MB buffer is touched as /dev/zero is read into it
    view = stack.run(spec("dd if=/dev/zero of=/dev/null bs=512M count=1"))
    assert view.status.value == "failed"
    f = view.failure
    assert (f.reason, f.stage, f.exit_code, f.oom_killed) == ("out_of_memory", "execution", 137, True)
    assert "OOMKilled" in f.message and "256 MB" in f.message


def test_only_loopback_inside_and_the_hosts_loopback_is_unreachable(stack):
    port = int(stack.validator_url.rsplit(":", 1)[1])
    assert httpx.get(f"{stack.validator_url}/v1/health").status_code == 200  # the server is up on the host
    view = stack.run(spec(f"ls /sys/class/net; echo x | nc -w 3 127.0.0.1 {port}; echo nc_exit=$?"))
    assert view.status.value == "completed"
    assert view.result.stdout.splitlines() == ["lo", "nc_exit=1"]
    assert "can't connect" in view.result.stderr


def test_container_runs_under_every_isolation_rule(stack, engine):
    """No network, read-only root, every capability dropped, no-new-privileges, a non-root user and
    the executor class's memory / CPU / pids limits, read back from the engine while the job runs."""
    handle = stack.submit(spec("sleep 3"))
    seen: list = []

    def watch():
        for _ in range(100):
            found = engine.containers.list(filters={"label": f"rayhorde.job={handle.job_id}"})
            if found:
                seen.append(found[0].attrs)
                return
            time.sleep(0.1)

    t = threading.Thread(target=watch)
    t.start()
    t.join()
    view = handle.result(timeout_s=60)
    assert view.status.value == "completed"
    assert seen, "never saw the job's container running"
    host, cfg = seen[0]["HostConfig"], seen[0]["Config"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert cfg["User"] == "65534:65534"
    assert host["Memory"] == 256 * 2**20 and host["MemorySwap"] == 256 * 2**20
    assert host["NanoCpus"] == 500_000_000 and host["PidsLimit"] == 64


def test_malformed_spec_is_refused_before_anything_runs(stack, engine):
    import jobs
    from cluster.errors import InvalidSpec

    since = time.time()
    with pytest.raises(InvalidSpec, match="command"):
        stack.submit({"image": IMAGE, "command": []})
    with pytest.raises(InvalidSpec, match="not a valid variable name"):
        stack.submit(spec("true", env={"BAD-NAME": "x"}))
    with pytest.raises(InvalidSpec, match="exceeds the always_on.test limit of 120 s"):
        stack.submit(spec("true", execution_timeout_s=3600))
    with pytest.raises(InvalidSpec, match="unknown executor class 'always_on.nope'"):
        stack.submit(spec("true", executor_class="always_on.nope"))
    assert container_events(engine, since) == []
    assert jobs.JobSpec  # the public model is the one validating


def test_missing_image_fails_at_the_image_stage(stack):
    view = stack.run({"image": "rayhorde/not-there:1", "command": ["true"]})
    assert view.status.value == "failed"
    assert (view.failure.reason, view.failure.stage) == ("image_pull_failed", "image_pull")
