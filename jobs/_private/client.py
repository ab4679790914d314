"""``submit(spec)`` for driver scripts (run with ``ray job submit``), and the job handle.

The driver holds a capability (scoped, expiring), never a user's hotkey. It registers the job
with validator-core, which answers with a ticket for a miner; the driver launches the organic
task pinned to that miner's resources; ``result()`` reads the signed result back from
validator-core. The driver never needs a value a miner produced.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
from pydantic import ValidationError

from cluster._private.http import ServiceClient
from cluster.errors import InvalidSpec, ServiceUnavailable, TicketRefused, UsageError
from jobs._private.models import JobSpec, JobView, Submitted
from jobs._private.task import organic_task

VALIDATOR_URL_ENV = "RAYHORDE_VALIDATOR_URL"
CAPABILITY_ENV = "RAYHORDE_CAPABILITY"
# Job-level runtime_env variables are inherited by every task of the job; blank ours in the
# organic task so the capability and validator address never reach a miner's node.
_SCRUB = {VALIDATOR_URL_ENV: "", CAPABILITY_ENV: ""}
_remote_task = None


class JobNotFinished(ServiceUnavailable, TimeoutError):
    """``result(timeout_s)`` ran out before the job reached a final status."""


class JobHandle:
    def __init__(self, client: ServiceClient, submitted: Submitted, task_ref: Any) -> None:
        self._client = client
        self.job_id = submitted.job_id
        self.ticket_id = submitted.ticket_id
        self.attempt = submitted.attempt
        self.miner_hotkey = submitted.miner_hotkey
        self.executor_class = submitted.executor_class
        self._task_ref = task_ref

    def status(self, wait_s: float = 0) -> JobView:
        """The job as validator-core records it; ``wait_s`` long-polls for a final status."""
        return JobView.model_validate(self._client.get(f"/v1/jobs/{self.job_id}", params={"wait_s": wait_s},
                                                       timeout=wait_s + 30))

    def result(self, timeout_s: float = 600, poll_s: float = 1.0) -> JobView:
        """Wait for a final status and return the job as validator-core recorded it.

        Long-polls validator-core in ``poll_s`` slices, checking between them whether the
        organic task came back refused (then validator-core may never hear of the job again).
        """
        deadline = time.monotonic() + timeout_s
        task_failed_at: float | None = None
        while True:
            view = self.status(wait_s=max(0.0, min(poll_s, deadline - time.monotonic())))
            if view.status.terminal:
                return view
            now = time.monotonic()
            if task_failed_at is None and self._task_ref is not None:
                ready, _ = ray.wait([self._task_ref], timeout=0)
                if ready:
                    answer = _task_answer(self._task_ref)
                    if not answer.get("ok"):
                        task_failed_at = now
                        refusal = answer
            if task_failed_at is not None and now - task_failed_at > 2:
                # the agent refused or never ran the ticket and validator-core has no final word
                raise TicketRefused(str(refusal.get("reason")), f"job {self.job_id}: {refusal.get('message')}")
            if now > deadline:
                raise JobNotFinished(f"job {self.job_id} is still {view.status.value} after {timeout_s:g} s")


def _task_answer(ref: Any) -> dict[str, Any]:
    try:
        answer = ray.get(ref, timeout=5)
        return answer if isinstance(answer, dict) else {"ok": False, "message": repr(answer)}
    except Exception as exc:  # the task died (node lost, worker crashed)
        return {"ok": False, "reason": "task_failed", "message": repr(exc)}


def submit(spec: JobSpec | dict[str, Any], *, validator_url: str | None = None,
           capability: str | None = None) -> JobHandle:
    """Register ``spec`` with validator-core and launch its organic task on the chosen miner."""
    try:
        spec = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidSpec(f"job spec is invalid: {exc}") from exc
    validator_url = validator_url or os.environ.get(VALIDATOR_URL_ENV)
    capability = capability or os.environ.get(CAPABILITY_ENV)
    if not validator_url or not capability:
        raise UsageError(f"set {VALIDATOR_URL_ENV} and {CAPABILITY_ENV} (e.g. with ray job submit "
                         "--runtime-env-json) or pass validator_url= and capability=")
    client = _client_for(validator_url, capability)
    submitted = Submitted.model_validate(client.post("/v1/jobs", spec.model_dump(mode="json")))
    return JobHandle(client, submitted, launch(submitted))


_clients: dict[tuple[str, str], ServiceClient] = {}


def _client_for(validator_url: str, capability: str) -> ServiceClient:
    """One keep-alive client per (validator, capability): a driver submitting many jobs reuses
    its connection instead of paying a TCP handshake per job."""
    key = (validator_url, capability)
    if key not in _clients:
        _clients[key] = ServiceClient(validator_url, headers={"Authorization": f"Bearer {capability}"})
    return _clients[key]


def launch(submitted: Submitted) -> Any:
    """Start the organic task for a ticket: ids only, pinned, no retries, no CPU accounting."""
    global _remote_task
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    if _remote_task is None:
        _remote_task = ray.remote(organic_task)
    return _remote_task.options(
        name="rayhorde.organic", num_cpus=0, max_retries=0, resources=submitted.resources,
        runtime_env={"env_vars": dict(_SCRUB)},
    ).remote(submitted.ticket_id, submitted.attempt)
