"""A job that prints without pause leaves at most its log cap on the miner's disk and in its
result (the engine's rotated json-file log, read with a bounded head and tail). The real
container engine, the local busybox image."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cluster.miner.docker_runtime import DockerRuntime
from cluster.miner.runtime import ContainerRun
from tests.conftest import DOCKER_HOST, IMAGE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LABEL = "rayhorde.test_container_logs"
CAP = 64 * 1024


def on_disk(engine, stop: threading.Event, seen: list[int]) -> None:
    """The largest size the job's log files (current + rotated) reached, sampled while it runs."""
    while not stop.wait(0.2):
        for c in engine.containers.list(filters={"label": f"{LABEL}=1"}):
            path = c.attrs.get("LogPath") or ""
            if path:
                seen.append(sum(size(p) for p in (path, path + ".1")))


def size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:  # rotated away between the listing and the stat
        return 0


def test_a_job_printing_for_60_s_leaves_at_most_the_cap(engine, tmp_path: Path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    artifacts.chmod(0o777)
    run = ContainerRun(image=IMAGE, command=["sh", "-c", "echo first-line; yes rayhorde-log-line"], memory_mb=64,
                       cpus_milli=500, pids=64, timeout_s=60, artifacts_host_dir=artifacts, log_max_bytes=CAP,
                       labels={LABEL: "1"})
    stop, seen = threading.Event(), []
    sampler = threading.Thread(target=on_disk, args=(engine, stop, seen), daemon=True)
    sampler.start()
    try:
        outcome = DockerRuntime(DOCKER_HOST).run(run)
    finally:
        stop.set()
        sampler.join(5)
    assert outcome.timed_out  # it printed all 60 s
    assert len(seen) > 100 and max(seen) <= CAP + 4096, max(seen)  # one json line of slack
    assert outcome.stdout_truncated and "rayhorde-log-line" in outcome.stdout
    assert "earlier output rotated away" in outcome.stdout and "first-line" not in outcome.stdout
    assert len(outcome.stdout.encode()) <= CAP + 200  # the cap, plus the markers


def test_a_short_log_is_whole(engine, tmp_path: Path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    artifacts.chmod(0o777)
    run = ContainerRun(image=IMAGE, command=["sh", "-c", "echo out; echo err >&2"], memory_mb=64, cpus_milli=500,
                       pids=64, timeout_s=20, artifacts_host_dir=artifacts, log_max_bytes=CAP, labels={LABEL: "1"})
    outcome = DockerRuntime(DOCKER_HOST).run(run)
    assert (outcome.stdout, outcome.stderr, outcome.stdout_truncated) == ("out\n", "err\n", False)
