"""`rayhorde up` / `down`: every process on loopback, and nothing survives `down`, even after
an agent was SIGKILLed and left its Ray node orphaned."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import psutil
import pytest

from cluster.fabric.ports import listening_sockets
from cluster.fabric.processes import process_tree
from cluster.fabric.ray_node import short_tmp
from cluster.devstack.local_stack import LocalStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_up_binds_loopback_only_and_down_leaves_nothing(engine, tmp_path):
    stack = LocalStack(tmp_path / "s", miners=1, executors_per_miner=1)
    state = stack.up()
    try:
        node = json.loads((tmp_path / "s" / "miner1" / "node.json").read_text())
        pids = process_tree([*state["pids"].values(), node["pid"]])
        listening = listening_sockets(pids)
        assert listening, "the stack should be listening somewhere"
        assert {ip for ip, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
        # the Jobs API needs the cluster token (token auth is on for the real head)
        assert httpx.get(f"{state['dashboard_url']}/api/jobs/").status_code == 401
        # an agent killed without a chance to clean up orphans its Ray node: down() still stops it
        os.kill(state["pids"]["miner1"], signal.SIGKILL)
        time.sleep(0.5)
    finally:
        stack.down()
    time.sleep(0.5)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert listening & listening_sockets() == set()
    assert engine.containers.list(all=True, filters={"label": "rayhorde.agent"}) == []
    assert not (tmp_path / "s" / "stack.json").exists()
    for name in ("head", "miner1"):  # the Ray temp dirs under /tmp go too
        assert not os.path.exists(short_tmp(tmp_path / "s", name)), name


def test_a_failed_start_says_why_and_leaves_nothing(engine, tmp_path):
    stack = LocalStack(tmp_path / "t", miners=1, miner_uris=["//Ferdie"])  # not in the metagraph: refused
    with pytest.raises(RuntimeError, match="miner1 .* exited during start-up"):
        stack.up(timeout_s=60)
    log = (tmp_path / "t" / "logs" / "miner1.log").read_text()
    assert "admission refused: not_registered: hotkey 5CiPPseXPECbkjWCa6MnjNokrgYjMqmKndv2rSnekmSK2DjL is not " \
           "registered on subnet 12" in log
    assert not (tmp_path / "t" / "stack.json").exists()
