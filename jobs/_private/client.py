"""``submit(spec)`` for driver scripts (run with ``ray job submit``), and the job handle.

The driver holds a capability (scoped, expiring), never a user's hotkey. It registers the job
with validator-core, which answers with a ticket for a miner, or queues the job. One follower
thread per driver long-polls validator-core for all of the driver's open jobs and launches the
organic task for every ticket it sees: the first one, a queued job's ticket when an executor
frees, or attempt n+1 after a miner was lost. ``result()`` reads the signed result back from
validator-core. The driver never reads a value a miner produced (see :meth:`JobHandle._check_task`).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
from pydantic import ValidationError

from cluster.protocol.http import CA_BUNDLE_ENV, ServiceClient
from cluster.errors import InvalidSpec, JobNotFinished, ServiceUnavailable, UsageError
from cluster.protocol.jobs import (
    CAPABILITY_ENV, VALIDATOR_URL_ENV, WATCH_MAX_JOBS, JobSpec, JobState, JobView, Submitted, TicketRef,
)
from jobs._private.task import organic_task

log = logging.getLogger("rayhorde.jobs")
# Job-level runtime_env variables are inherited by every task of the job; blank ours in the
# organic task so the capability and validator address never reach a miner's node.
_SCRUB = {VALIDATOR_URL_ENV: "", CAPABILITY_ENV: ""}
_remote_task = None


class JobHandle:
    def __init__(self, client: ServiceClient, job_id: str, executor_class: str) -> None:
        self._client = client
        self.job_id = job_id
        self.executor_class = executor_class
        self.ticket: TicketRef | None = None
        self.queue_reason = ""  # why the job waited at submission ("" = it got a ticket at once)
        self._task_ref: Any = None
        self._done = threading.Event()

    # the attempt currently running (None while queued)
    @property
    def ticket_id(self) -> str | None:
        return self.ticket.ticket_id if self.ticket else None

    @property
    def attempt(self) -> int:
        return self.ticket.attempt if self.ticket else 0

    @property
    def miner_hotkey(self) -> str | None:
        return self.ticket.miner_hotkey if self.ticket else None

    def status(self, wait_s: float = 0) -> JobView:
        """The job as validator-core records it; ``wait_s`` long-polls for a final status."""
        return JobView.model_validate(self._client.get(f"/v1/jobs/{self.job_id}", params={"wait_s": wait_s},
                                                       timeout=wait_s + 30))

    def result(self, timeout_s: float = 600) -> JobView:
        """Wait for a final status and return the job as validator-core recorded it."""
        if not self._done.wait(timeout_s):
            raise JobNotFinished(f"job {self.job_id} is not finished after {timeout_s:g} s "
                                 f"({'attempt ' + str(self.attempt) if self.ticket else 'queued: ' + self.queue_reason})")
        deadline = time.monotonic() + 60
        while True:  # validator-core may be restarting: keep asking for a while
            try:
                return self.status()
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    # -- called by the follower
    def _follow(self, state: JobState) -> None:
        if state.status.terminal:
            self._done.set()
            return
        if state.ticket is not None and state.ticket.ticket_id != self.ticket_id:
            self.ticket = state.ticket
            self._task_ref = launch(state.ticket)

    def _check_task(self) -> None:
        """Forget the task once Ray says it ended. Its return value is never read: the task ran on a
        miner's node, and reading a value means unpickling bytes a miner chose (code, if it wants).
        What became of the attempt, a refused ticket included, is validator-core's to say."""
        if self._task_ref is not None and ray.wait([self._task_ref], timeout=0, fetch_local=False)[0]:
            self._task_ref = None


class _Follower:
    """One thread per (validator, capability): follows every open job of this driver."""

    def __init__(self, client: ServiceClient) -> None:
        self.client = client
        self.handles: dict[str, JobHandle] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rayhorde-jobs-follower", daemon=True)
        self.thread.start()

    def add(self, handle: JobHandle) -> None:
        with self.lock:
            self.handles[handle.job_id] = handle
        self.wake.set()

    def _run(self) -> None:
        while True:
            with self.lock:
                open_jobs = {jid: h for jid, h in self.handles.items() if not h._done.is_set()}
            if not open_jobs:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                known = {j: h.ticket_id for j, h in itertools.islice(open_jobs.items(), WATCH_MAX_JOBS)}
                states = self.client.post("/v1/jobs/watch", {"known": known, "wait_s": 0.5}, timeout=40)
            except ServiceUnavailable as exc:  # validator-core restarting: keep following
                log.warning("following jobs: %s", exc)
                time.sleep(0.5)
                continue
            except Exception:
                log.exception("following jobs failed")
                time.sleep(0.5)
                continue
            for raw in states:
                state = JobState.model_validate(raw)
                handle = open_jobs.get(state.job_id)
                if handle is not None:
                    try:
                        handle._follow(state)
                    except Exception:
                        log.exception("could not launch the task for job %s", state.job_id)
            for handle in open_jobs.values():
                handle._check_task()
            with self.lock:
                self.handles = {j: h for j, h in self.handles.items() if not h._done.is_set()}


_clients: dict[tuple[str, str, str], tuple[ServiceClient, _Follower]] = {}
_clients_lock = threading.Lock()


def _client_for(validator_url: str, capability: str, ca_bundle: str | Path | None) -> tuple[ServiceClient, _Follower]:
    """One keep-alive client and one follower per (validator, capability, CA bundle)."""
    ca_bundle = ca_bundle or os.environ.get(CA_BUNDLE_ENV) or None
    key = (validator_url, capability, str(ca_bundle or ""))
    with _clients_lock:
        if key not in _clients:
            headers = {"Authorization": f"Bearer {capability}"}
            client = ServiceClient(validator_url, headers=headers, verify=ca_bundle)
            watcher = ServiceClient(validator_url, headers=headers, verify=ca_bundle)
            _clients[key] = (client, _Follower(watcher))
        return _clients[key]


def submit(spec: JobSpec | dict[str, Any], *, validator_url: str | None = None,
           capability: str | None = None, ca_bundle: str | Path | None = None) -> JobHandle:
    """Register ``spec`` with validator-core; its organic task starts as soon as it has a ticket.
    ``ca_bundle`` verifies validator-core's certificate (default ``$RAYHORDE_CA_BUNDLE``, else the
    default CAs)."""
    try:
        spec = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidSpec(f"job spec is invalid: {exc}") from exc
    validator_url = validator_url or os.environ.get(VALIDATOR_URL_ENV)
    capability = capability or os.environ.get(CAPABILITY_ENV)
    if not validator_url or not capability:
        raise UsageError(f"set {VALIDATOR_URL_ENV} and {CAPABILITY_ENV} (e.g. with ray job submit "
                         "--runtime-env-json) or pass validator_url= and capability=")
    client, follower = _client_for(validator_url, capability, ca_bundle)
    submitted = Submitted.model_validate(client.post("/v1/jobs", spec.model_dump(mode="json")))
    handle = JobHandle(client, submitted.job_id, spec.executor_class)
    handle.queue_reason = submitted.queue_reason
    if submitted.ticket is not None:
        handle._follow(JobState(job_id=submitted.job_id, status="received", ticket=submitted.ticket))
    follower.add(handle)
    return handle


def follow(job_id: str, *, validator_url: str | None = None, capability: str | None = None,
           ca_bundle: str | Path | None = None) -> JobHandle:
    """Drive a job registered already (``rayhorde job run`` registers it itself, so its spec never
    enters Ray's job table): launch its organic task for every ticket, as :func:`submit` does.
    ``capability`` may be the scope of this one job."""
    validator_url = validator_url or os.environ.get(VALIDATOR_URL_ENV)
    capability = capability or os.environ.get(CAPABILITY_ENV)
    if not validator_url or not capability:
        raise UsageError(f"set {VALIDATOR_URL_ENV} and {CAPABILITY_ENV} or pass validator_url= and capability=")
    client, follower = _client_for(validator_url, capability, ca_bundle)
    view = JobView.model_validate(client.get(f"/v1/jobs/{job_id}"))
    handle = JobHandle(client, job_id, view.executor_class)
    handle._follow(JobState(job_id=job_id, status=view.status, ticket=view.ticket))
    follower.add(handle)
    return handle


def launch(ticket: TicketRef) -> Any:
    """Start the organic task for a ticket: ids only, pinned, no retries, no CPU accounting."""
    global _remote_task
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    if _remote_task is None:
        _remote_task = ray.remote(organic_task)
    return _remote_task.options(
        name="rayhorde.organic", num_cpus=0, max_retries=0, resources=ticket.resources,
        runtime_env={"env_vars": dict(_SCRUB)},
    ).remote(ticket.ticket_id, ticket.attempt)
