"""Nothing valuable crosses the fabric: no hotkey, capability or validator URL in a Ray worker,
only ticket ids in the tasks' arguments.

The driver in this session carries the capability and the validator URL in its job-level
runtime env, exactly as ``ray job submit --runtime-env-json`` would, so these tests would catch
them leaking into the organic task on a miner's node.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import ray
from ray.remote_function import RemoteFunction

from jobs._private import client as jobs_client
from tests.conftest import HELLO, IMAGE

pytestmark = pytest.mark.integration


def _probe() -> dict:
    """Everything an organic task's process can see in its environment and working directory."""
    seen: dict = {"env": dict(os.environ), "cwd": os.getcwd(), "files": {}}
    for root, _dirs, files in os.walk(os.getcwd()):
        for name in files:
            path = Path(root) / name
            try:
                seen["files"][str(path)] = path.read_bytes()[:1_000_000].decode("utf-8", "replace")
            except OSError as exc:
                seen["files"][str(path)] = f"<{exc}>"
    return seen


@pytest.fixture(scope="module")
def secret_job(stack, monkeypatch_module):
    """Run a job whose env value is a fresh secret, recording what the driver handed to Ray."""
    calls: list[dict] = []
    original = RemoteFunction._remote

    def recording(self, args=None, kwargs=None, **options):
        calls.append({"function": self._function_name, "args": args, "kwargs": kwargs, "options": options})
        return original(self, args=args, kwargs=kwargs, **options)

    monkeypatch_module.setattr(RemoteFunction, "_remote", recording)
    secret = f"s3cret-{uuid.uuid4().hex}"
    handle = stack.submit({"image": IMAGE, "command": ["sh", "-c", HELLO], "env": {"NAME": secret}})
    view = handle.result(timeout_s=120)
    monkeypatch_module.undo()
    assert view.status.value == "completed"
    return {"secret": secret, "handle": handle, "view": view, "calls": calls}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_the_organic_task_carries_ids_only(secret_job):
    calls = [c for c in secret_job["calls"] if c["function"].endswith("organic_task")]
    assert len(calls) == 1
    call = calls[0]
    handle = secret_job["handle"]
    assert call["args"] == [handle.ticket_id, handle.attempt] or call["args"] == (handle.ticket_id, handle.attempt)
    assert not call["kwargs"]
    assert isinstance(handle.ticket_id, str) and len(handle.ticket_id) == 32 and isinstance(handle.attempt, int)
    everything = repr(call)
    for value in (secret_job["secret"], "tee -a", IMAGE):
        assert value not in everything
    assert call["options"]["max_retries"] == 0 and call["options"]["num_cpus"] == 0
    assert call["options"]["resources"] == {f"miner:{handle.miner_hotkey}": 0.001, "executor:always_on.test": 1.0}


def test_a_task_on_the_miners_node_finds_nothing_valuable(stack, secret_job):
    handle = secret_job["handle"]
    probe = ray.remote(_probe).options(num_cpus=0, max_retries=0, resources={f"miner:{handle.miner_hotkey}": 0.001},
                                       runtime_env={"env_vars": dict(jobs_client._SCRUB)})
    seen = ray.get(probe.remote(), timeout=60)
    assert seen["env"]["RAYHORDE_AGENT_SOCKET"].endswith("agent.sock")  # it ran on a miner node
    haystack = json.dumps(seen)
    miner_name = next(n for n, hk in stack.miners.items() if hk == handle.miner_hotkey)
    wallet = json.loads((stack.home / "wallets" / miner_name / "hotkeys" / "default").read_text())
    validator_wallet = json.loads((stack.home / "wallets" / "validator" / "hotkeys" / "default").read_text())
    forbidden = {
        "job env value": secret_job["secret"],
        "job spec": 'echo "Hello, $NAME!"',
        "result artifact": f"Hello, {secret_job['secret']}!",
        "validator URL": stack.validator_url,
        "validator port": stack.validator_url.rsplit(":", 1)[1],
        "capability": stack.capability,
        "miner secret (private key)": wallet["privateKey"].removeprefix("0x"),
        "validator secret (private key)": validator_wallet["privateKey"].removeprefix("0x"),
        "ticket id": handle.ticket_id,
    }
    leaks = [what for what, value in forbidden.items() if value and value in haystack]
    assert leaks == [], f"found on the miner node: {leaks}"
    assert seen["files"] == {}, "the task's working directory should be empty"


def test_the_capability_does_reach_tasks_that_do_not_scrub_it(stack):
    """Control: without the organic task's scrub, job-level env vars DO reach a miner's node, so
    the test above would have caught a leak."""
    miner = next(iter(stack.miners.values()))
    probe = ray.remote(_probe).options(num_cpus=0, max_retries=0, resources={f"miner:{miner}": 0.001})
    seen = ray.get(probe.remote(), timeout=60)
    assert seen["env"].get("RAYHORDE_CAPABILITY") == stack.capability
