"""Surviving a dead miner node and a validator-core crash."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from cluster.protocol.envelope import seal
from cluster.protocol.http import ServiceClient
from cluster.protocol.identity import Hotkey
from cluster.errors import TicketRefused
from cluster.protocol.jobs import JobResult
from cluster.validator.ray_state import RayState
from tests.conftest import IMAGE
from tests.support.net import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
URIS = {"miner1": "//Bob", "miner2": "//Charlie"}



def wait_both_miners_live(stack, timeout_s: float = 60) -> None:
    def live():
        st = httpx.get(f"{stack.validator_url}/v1/status", timeout=5).json()
        return sum(1 for m in st["miners"] if m["node_id"] and m["heartbeat_age_s"] < 5) == 2
    wait_for(live, timeout_s, "both miners live")


def test_job_survives_its_miners_ray_node_being_killed(stack, engine):
    wait_both_miners_live(stack)
    handle = stack.submit({"image": IMAGE, "command": ["sh", "-c", "sleep 6; echo done | tee /artifacts/out"]})
    wait_for(lambda: engine.containers.list(filters={"label": f"rayhorde.job={handle.job_id}"}), 30,
             "the first attempt's container")
    first_ticket, first_miner = handle.ticket_id, handle.miner_hotkey
    name = next(n for n, hk in stack.miners.items() if hk == first_miner)
    node = json.loads((stack.home / name / "node.json").read_text())
    os.killpg(node["pid"], signal.SIGKILL)  # the raylet, GCS client, agents: the whole node
    killed = time.time()

    view = handle.result(timeout_s=120)
    assert view.status.value == "completed", [(e.attempt, e.status.value, e.detail) for e in view.history]
    assert view.attempt == 2 and view.miner_hotkey != first_miner
    assert view.artifact("/artifacts/out") == b"done\n"
    attempts = {e.attempt for e in view.history}
    assert {1, 2} <= attempts
    lost = [e.detail for e in view.history if "lost: ray_node_lost" in e.detail]
    assert lost == [f"attempt 1 on miner {first_miner} lost: ray_node_lost (fabric incident, not charged); re-queued"]
    # the first attempt's container is gone
    assert engine.containers.list(all=True, filters={"label": f"rayhorde.ticket={first_ticket}"}) == []
    # a late result for the first attempt is refused
    late = JobResult(job_id=handle.job_id, ticket_id=first_ticket, attempt=1, miner_hotkey=first_miner,
                     status="completed", exit_code=0)
    with pytest.raises(TicketRefused) as err:
        ServiceClient(stack.validator_url).post_signed(f"/v1/jobs/{handle.job_id}/result",
                                                       seal(Hotkey.from_uri(URIS[name]), "job_result", late))
    assert err.value.reason == "ticket_closed"
    # and its late upload: the agent asks "still current?" before uploading, and hears no
    from cluster.protocol.messages import TicketFetch
    answer = ServiceClient(stack.validator_url).post_signed("/v1/tickets/current", seal(
        Hotkey.from_uri(URIS[name]), "ticket_current", TicketFetch(ticket_id=first_ticket)))
    assert answer == {"current": False}
    # Ray's own view confirms the report well within node_lost_confirm_s (30 s): never charged
    ray = RayState(stack.state["dashboard_url"], stack.token)
    wait_for(lambda: ray.node_state(node["node_id"]) == "DEAD", 30 - (time.time() - killed), "Ray to see the node dead")
    time.sleep(2)  # a sweep or two: validator-core's check of the report sees it too
    # the incident is recorded as a fabric incident (the agent kept heartbeating), not charged
    incidents = [i for i in httpx.get(f"{stack.validator_url}/v1/status").json()["incidents"]
                 if i["job_id"] == handle.job_id]
    assert [(i["miner_hotkey"], i["kind"], i["reason"], i["attempt"]) for i in incidents] == [
        (first_miner, "fabric", "ray_node_lost", 1)]
    wait_both_miners_live(stack)  # the node rejoined


def test_validator_core_crash_loses_nothing(stack, engine):
    wait_both_miners_live(stack)
    handle = stack.submit({"image": IMAGE, "command": ["sh", "-c", "sleep 4; echo survived"]})
    def ready():
        view = handle.status()
        return view if any(e.status.value == "executor_ready" for e in view.history) else None

    before = wait_for(ready, 30, "executor_ready")
    pid = stack.local._state()["pids"]["validator"]
    os.killpg(pid, signal.SIGKILL)
    time.sleep(5)  # the container finishes meanwhile: the agent's reports are in flight, retrying
    stack.local.restart("validator")
    view = handle.result(timeout_s=120)
    assert view.status.value == "completed"
    assert view.result.stdout == "survived\n"
    recorded = [(e.status, e.t_ns, e.detail) for e in before.history]
    assert [(e.status, e.t_ns, e.detail) for e in view.history][:len(recorded)] == recorded
    assert [e.status.value for e in view.history][-2:] == ["execution_done", "completed"]
    wait_both_miners_live(stack)


def test_agent_restart_cleans_up_and_its_job_moves_on(stack, engine):
    wait_both_miners_live(stack)
    handle = stack.submit({"image": IMAGE, "command": ["sh", "-c", "sleep 8; echo moved"]})
    first = wait_for(lambda: engine.containers.list(filters={"label": f"rayhorde.job={handle.job_id}"}), 30,
                     "the first attempt's container")[0]
    first_miner = handle.miner_hotkey
    name = next(n for n, hk in stack.miners.items() if hk == first_miner)
    os.killpg(stack.local._state()["pids"][name], signal.SIGKILL)  # no chance to clean up
    time.sleep(0.5)
    assert engine.containers.get(first.id).status == "running"  # left behind by the killed agent
    stack.local.restart(name)

    view = handle.result(timeout_s=120)
    assert view.status.value == "completed" and view.result.stdout == "moved\n"
    assert view.attempt == 2 and view.miner_hotkey != first_miner
    assert any(f"attempt 1 on miner {first_miner} lost: agent_restarted (charged to the miner)" in e.detail
               for e in view.history)
    assert engine.containers.list(all=True, filters={"id": first.id}) == []  # the restarted agent removed it
    assert list((stack.home / name / "jobs").glob("*")) == []  # and the job dir (with its tmpfs mounts)
    incidents = httpx.get(f"{stack.validator_url}/v1/status").json()["incidents"]
    assert any(i["job_id"] == handle.job_id and i["kind"] == "miner" and i["reason"] == "agent_restarted"
               for i in incidents)
    wait_both_miners_live(stack)
