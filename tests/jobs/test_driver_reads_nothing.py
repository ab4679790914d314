"""A driver never unpickles what a miner produced: the organic task's return value comes from a
miner's Ray worker, and a hostile miner can return bytes that run code when unpickled."""

from __future__ import annotations

import pathlib

import pytest
import ray

from cluster.protocol.jobs import TicketRef
from cluster.protocol.messages import executor_resource, miner_resource
from jobs._private.client import JobHandle

pytestmark = pytest.mark.integration


def test_a_driver_fed_a_crafted_task_result_runs_none_of_it(stack, tmp_path):
    marker = tmp_path / "unpickled"
    miner = next(iter(stack.miners.values()))

    @ray.remote(num_cpus=0, max_retries=0)
    def hostile_miner_task(path: str):
        class Payload:  # what a miner's modified worker returns instead of the agent's answer
            def __reduce__(self):
                return pathlib.Path.touch, (pathlib.Path(path),)  # runs in whoever unpickles it
        return Payload()

    ref = hostile_miner_task.options(resources={miner_resource(miner): 0.001}).remote(str(marker))
    ray.wait([ref], timeout=60, fetch_local=False)
    handle = JobHandle(client=None, job_id="j", executor_class="always_on.test")
    handle.ticket = TicketRef(ticket_id="t", attempt=1, miner_hotkey=miner, executor_class="always_on.test",
                              resources={miner_resource(miner): 0.001, executor_resource("always_on.test"): 1.0})
    handle._task_ref = ref
    handle._check_task()  # what the follower does with every finished task
    assert handle._task_ref is None  # the task is seen as ended...
    assert not marker.exists()  # ...and nothing of its value ran
    ray.get(ref)  # the control: the payload does run when unpickled
    assert marker.exists()
