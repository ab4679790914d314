"""The `rayhorde` CLI against the running local stack: job run / status / logs / list / cancel, scores,
streams, and the demo's `ray job submit` of the shipped example from outside the checkout."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from click.testing import CliRunner

from cluster.cli.demo import ray_job_submit
from cluster.cli.main import main
from cluster.errors import SignatureRejected
from cluster.protocol.envelope import SignedEnvelope
from cluster.protocol.messages import Capability
from tests.conftest import HELLO, IMAGE

pytestmark = pytest.mark.integration


def cli(stack, *args: str):
    result = CliRunner().invoke(main, [*args[:2], "--home", str(stack.home), *args[2:]], catch_exceptions=False)
    return result


def test_job_run_prints_the_hello_world_result(stack):
    out = cli(stack, "job", "run", "--env", "NAME=CLI", "--", "sh", "-c", HELLO)
    assert out.exit_code == 0, out.output
    assert "status    completed" in out.output
    assert "artifact  /artifacts/stuff = 'Hello, CLI!\\n'" in out.output
    job_id = out.output.split("job ", 1)[1].split()[0]

    status = cli(stack, "job", "status", job_id)
    assert "status    completed" in status.output and "ticket for miner" in status.output
    miner = status.output.split("ticket for miner ", 1)[1][:12]
    scored = CliRunner().invoke(main, ["scores", "--home", str(stack.home)], catch_exceptions=False)
    assert scored.exit_code == 0 and "(running;" in scored.output, scored.output
    [line] = [ln for ln in scored.output.splitlines() if f"{miner}..." in ln and "organic" in ln][:1]
    assert " 0 jobs" not in line  # the job it just completed counts for its miner
    for bad, why in (("closed=1000", "closed: Input should be less than or equal to 100"),
                     ("cycle=-1", "cycle: Input should be greater than or equal to 0")):
        resp = httpx.get(f"{stack.validator_url}/v1/scores?{bad}", timeout=10)
        assert resp.status_code == 422 and why in resp.json()["error"]["message"], resp.text
    logs = cli(stack, "job", "logs", job_id)
    assert logs.output.startswith("Hello, CLI!")
    listing = cli(stack, "job", "list")
    assert job_id in listing.output and "completed" in listing.output


def test_job_run_exits_nonzero_for_a_failed_job(stack):
    out = cli(stack, "job", "run", "--", "sh", "-c", "exit 4")
    assert out.exit_code == 1
    assert "failure   job_failure: nonzero_return_code at stage execution, exit 4" in out.output


def test_cancel_kills_the_container_and_records_cancelled(stack, engine):
    handle = stack.submit({"image": IMAGE, "command": ["sleep", "60"]})
    deadline = time.time() + 30
    while not engine.containers.list(filters={"label": f"rayhorde.job={handle.job_id}"}):
        assert time.time() < deadline, "the job never started"
        time.sleep(0.1)
    out = cli(stack, "job", "cancel", handle.job_id)
    assert out.output.strip() == f"job {handle.job_id}: cancelled"
    t0 = time.time()
    # sparse: no inspect per container, which would race with the agent removing it (404)
    while engine.containers.list(all=True, sparse=True, filters={"label": f"rayhorde.job={handle.job_id}"}):
        # the agent learns it at its next heartbeat (every 2 s): a liveness bound, not a benchmark
        assert time.time() - t0 < 3 * 2 + 5, "the cancelled job's container is still there"
        time.sleep(0.2)
    view = handle.result(timeout_s=30)
    assert view.status.value == "cancelled"
    assert view.history[-1].detail == "cancelled by user"
    again = CliRunner().invoke(main, ["job", "cancel", "--home", str(stack.home), handle.job_id])
    assert again.exit_code == 2
    assert again.stderr == f"error: already_finished: job {handle.job_id} is already cancelled\n"


@pytest.mark.slow
def test_stream_deploy_call_status_terminate(stack):
    out = cli(stack, "stream", "deploy", "--app", "echo", "--version", "1")
    assert out.exit_code == 0, out.output
    job_id = out.stdout.split("stream ", 1)[1].split()[0]
    assert "status    streaming_ready" in out.stdout and f"/jobs/{job_id}" in out.stdout
    called = cli(stack, "stream", "call", job_id, "/echo", "--data", '{"hi": 1}')
    assert called.exit_code == 0, called.output
    assert called.stdout.startswith('{"echo":"{\\"hi\\": 1}"}')
    assert "receipt verified: seq 0" in called.stderr
    status = cli(stack, "stream", "status", job_id)
    assert "streaming_ready" in status.stdout
    ended = cli(stack, "stream", "terminate", job_id)
    assert ended.stdout.strip() == f"stream {job_id}: completed"
    again = CliRunner().invoke(main, ["stream", "terminate", "--home", str(stack.home), job_id])
    assert again.exit_code == 2 and "already_finished" in again.stderr


def test_the_demo_submits_the_shipped_example_from_a_temporary_working_dir(stack):
    done = ray_job_submit(stack.state, stack.capability, "hello.py")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "artifact /artifacts/stuff = 'Hello, rayhorde!\\n'" in done.stdout
    # the capability was given to `ray job submit` and stayed with the gateway
    table = _job_table(stack)
    assert stack.capability not in json.dumps(table, default=str)
    assert [c.scope for c in _capabilities_in(table)] and {c.scope for c in _capabilities_in(table)} <= {"submission", "job"}


def _job_table(stack) -> list[dict]:
    """Ray's job table as any member reads it with the cluster token: the Jobs API's submissions
    and the GCS's drivers (less this test session's own driver, which holds the capability)."""
    import ray
    from ray.job_submission import JobSubmissionClient

    auth = {"Authorization": f"Bearer {stack.token}"}
    dashboard = stack.state["dashboard_url"]
    subs = [j.model_dump() if hasattr(j, "model_dump") else j.dict() for j in
            JobSubmissionClient(dashboard, headers=auth).list_jobs()]
    drivers = httpx.get(f"{dashboard}/api/v0/jobs", params={"detail": "true", "limit": "1000"}, headers=auth,
                        timeout=30).json()["data"]["result"]["result"]
    this = ray.get_runtime_context().get_job_id()
    return [j for j in subs + drivers if j.get("job_id") != this]


def _capabilities_in(value) -> list[Capability]:
    """Every string in ``value`` that is a capability this validator signed."""
    if isinstance(value, dict):
        return [c for v in value.values() for c in _capabilities_in(v)]
    if isinstance(value, list):
        return [c for v in value for c in _capabilities_in(v)]
    if isinstance(value, str) and len(value) > 40:
        try:
            env = SignedEnvelope.from_token(value)
        except (SignatureRejected, ValueError):
            return []
        return [Capability.model_validate(env.payload)] if env.kind == "capability" else []
    return []


def test_the_job_table_holds_a_single_job_scope_and_no_spec_secret(stack):
    secret = f"s3cret-{uuid.uuid4().hex}"
    out = cli(stack, "job", "run", "--env", f"TOKEN={secret}", "--", "sh", "-c", "echo ok")
    assert out.exit_code == 0, out.output
    job_id = out.output.split("job ", 1)[1].split()[0]
    table = _job_table(stack)
    assert secret not in json.dumps(table, default=str)  # the spec went to validator-core only
    assert stack.capability not in json.dumps(table, default=str)
    scopes = _capabilities_in(table)
    assert scopes and [c for c in scopes if c.scope == "user"] == []
    # its driver's (listed as a submission and as a GCS driver): one scope, for that job only
    assert {(c.scope, c.max_jobs, c.capability_id) for c in scopes if c.job_id == job_id} == {
        ("job", 0, next(c.capability_id for c in scopes if c.job_id == job_id))}
