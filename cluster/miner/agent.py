"""The miner agent's decisions: which tickets to run, and running them (no Ray, no HTTP server).

A ticket runs only if it is signed by the validator this agent joined, addressed to this
agent's hotkey, unexpired (with the configured clock leeway) and never seen before (the
seen-ticket store survives restarts). The spec comes from validator-core, signed by the same
validator and bound to the ticket. Results are signed with the miner hotkey.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from cluster.protocol.canonical import NS
from cluster.protocol.envelope import SignedEnvelope, open_envelope, seal
from cluster.protocol.http import ServiceClient
from cluster.protocol.identity import Clock, Hotkey, system_clock
from cluster.miner.runtime import REQUIRED, ContainerOutcome, ContainerRun, ContainerRuntime
from cluster.miner.uploads import upload_outputs
from cluster.miner.volumes import VolumeLimits, prepare_volumes
from cluster.protocol.messages import SpecGrant, StatusReport, Ticket, TicketFetch
from cluster.settings import ExecutorClass
from cluster.errors import (
    EngineError, GpuUnsupported, ImagePullFailed, ImageUnavailable, Refused, ServiceUnavailable, SignatureRejected,
    TicketRefused, UploadError, VolumeError,
)
from cluster.protocol.jobs import Failure, FailureKind, JobResult, JobSpec, JobStatus

log = logging.getLogger("rayhorde.agent")
AGENT_LABEL = "rayhorde.agent"


class SeenTickets:
    """Single-use tickets: a ticket id is recorded before its container starts."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (ticket_id TEXT PRIMARY KEY, t_ns INTEGER)")
        self._lock = threading.Lock()

    def check_and_record(self, ticket_id: str, t_ns: int) -> bool:
        with self._lock:
            try:
                self._db.execute("INSERT INTO seen VALUES (?, ?)", (ticket_id, t_ns))
                return True
            except sqlite3.IntegrityError:
                return False


class AgentCore:
    def __init__(self, *, hotkey: Hotkey, validator_hotkey: str, validator: ServiceClient, runtime: ContainerRuntime,
                 classes: dict[str, ExecutorClass], home: Path, max_skew_s: float, image_user: str = "65534:65534",
                 allow_private_networks: bool = False, hf_endpoint: str | None = None,
                 clock: Clock = system_clock) -> None:
        missing = REQUIRED & ~runtime.features
        if missing:
            raise EngineError(f"container runtime {type(runtime).__name__} lacks {missing}; refusing to run jobs")
        self.hotkey = hotkey
        self.validator_hotkey = validator_hotkey
        self.validator = validator
        self.runtime = runtime
        self.classes = classes
        self.home = home
        self.max_skew_s = max_skew_s
        self.image_user = image_user
        self.allow_private_networks = allow_private_networks
        self.hf_endpoint = hf_endpoint
        self.clock = clock
        home.mkdir(parents=True, exist_ok=True)
        self.seen = SeenTickets(home / "seen_tickets.db")
        self.running: set[str] = set()
        # Bumped when our Ray node dies: results of attempts started under an older epoch are
        # dropped, because validator-core has already given those attempts to another miner.
        self.node_epoch = 0

    # ---------------------------------------------------------------- entry points
    def run_ticket(self, ticket_id: str, attempt: int) -> JobStatus:
        """What the Ray task's poke triggers: fetch, verify, run, report. Returns the final status."""
        bundle = self.validator.post_signed("/v1/tickets/fetch", seal(self.hotkey, "ticket_fetch",
                                                                      TicketFetch(ticket_id=ticket_id), clock=self.clock))
        return self.execute_bundle(bundle, ticket_id=ticket_id, attempt=attempt)

    def execute_bundle(self, bundle: dict[str, Any], *, ticket_id: str, attempt: int) -> JobStatus:
        try:
            ticket, spec = self.verify(bundle, ticket_id=ticket_id, attempt=attempt)
        except TicketRefused as exc:
            self._decline(bundle, ticket_id, exc)
            raise
        epoch = self.node_epoch
        self.running.add(ticket.ticket_id)
        try:
            result = self._execute(ticket, spec)
        finally:
            self.running.discard(ticket.ticket_id)
        if epoch != self.node_epoch:
            raise TicketRefused("ticket_closed", f"ticket {ticket_id}: our Ray node died during the run; "
                                "validator-core re-tickets the job, so this result is dropped")
        self._post("result", f"/v1/jobs/{ticket.job_id}/result", lambda: seal(self.hotkey, "job_result", result,
                                                                              clock=self.clock))
        return JobStatus(result.status)

    def _post(self, what: str, path: str, make_envelope, *, patience_s: float = 120) -> None:
        """POST a signed report, retrying while validator-core is unreachable (it may be
        restarting). Each try is sealed afresh (a stale envelope would fail the skew check); a
        ``replayed`` or ``ticket_closed`` answer after a lost response means the first try landed."""
        deadline = time.monotonic() + patience_s
        lost_response = False
        delay = 0.2
        while True:
            try:
                self.validator.post_signed(path, make_envelope())
                return
            except ServiceUnavailable as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s report to validator-core failed (%s); retrying in %.1f s", what, exc, delay)
                lost_response = True
                time.sleep(delay)
                delay = min(delay * 2, 5)
            except Refused as exc:
                if lost_response and exc.reason in ("replayed", "ticket_closed"):
                    return
                raise

    # ---------------------------------------------------------------- checks
    def verify(self, bundle: dict[str, Any], *, ticket_id: str, attempt: int) -> tuple[Ticket, JobSpec]:
        try:
            t_env = SignedEnvelope.model_validate(bundle["ticket"])
            s_env = SignedEnvelope.model_validate(bundle["spec"])
            ticket = Ticket.model_validate(open_envelope(t_env, kind="ticket", max_skew_s=self.max_skew_s,
                                                         signers=[self.validator_hotkey], check_time=False))
            grant = SpecGrant.model_validate(open_envelope(s_env, kind="job_spec", max_skew_s=self.max_skew_s,
                                                           signers=[self.validator_hotkey], clock=self.clock))
        except SignatureRejected as exc:
            raise TicketRefused("invalid_signature", f"ticket {ticket_id} refused: {exc.message}") from exc
        except (KeyError, ValueError) as exc:
            raise TicketRefused("malformed", f"ticket {ticket_id} refused: malformed bundle ({exc})") from exc
        if ticket.ticket_id != ticket_id or grant.ticket_id != ticket_id or grant.job_id != ticket.job_id:
            raise TicketRefused("malformed", f"ticket {ticket_id} refused: ticket, spec and request disagree")
        if ticket.miner != self.hotkey.ss58:
            raise TicketRefused("wrong_miner", f"ticket {ticket_id} is addressed to {ticket.miner}; this miner is "
                                f"{self.hotkey.ss58}")
        if ticket.attempt != attempt:
            raise TicketRefused("wrong_attempt", f"ticket {ticket_id} is for attempt {ticket.attempt}, not {attempt}")
        now = self.clock()
        late_s = (now - ticket.expires_ns) / NS
        if late_s > self.max_skew_s:
            raise TicketRefused("ticket_expired", f"ticket {ticket_id} expired {late_s:.1f} s ago; "
                                f"max skew {self.max_skew_s:g} s")
        if not self.seen.check_and_record(ticket_id, now):
            raise TicketRefused("ticket_replayed", f"ticket {ticket_id} was already run by this miner; tickets are "
                                "single use")
        return ticket, grant.spec

    # ticket refusals that say the ticket itself is unusable, whoever poked: reported to validator-core.
    # Not wrong_attempt or ticket_replayed: any task on this node can poke with those, and the ticket
    # they name may be running here; answering them with a rejection would end a good attempt.
    DECLINED = ("invalid_signature", "malformed", "wrong_miner", "ticket_expired")

    def _decline(self, bundle: dict[str, Any], ticket_id: str, exc: TicketRefused) -> None:
        """Tell validator-core that this miner refused the ticket, and why: the job ends ``rejected``
        with that reason (the driver reads it from validator-core, never from the task's return value).
        The job id and attempt are read from the bundle unverified: validator-core only accepts the
        report for the current ticket of that job, addressed to this miner."""
        if exc.reason not in self.DECLINED:
            return
        try:
            claimed = SignedEnvelope.model_validate(bundle["ticket"]).payload
            job_id, attempt = str(claimed["job_id"]), int(claimed["attempt"])
        except (KeyError, TypeError, ValueError):
            log.warning("ticket %s refused (%s); its bundle names no job to report it for", ticket_id, exc)
            return
        report = StatusReport(ticket_id=ticket_id, attempt=attempt, status=JobStatus.rejected, detail=exc.message,
                              failure=Failure(kind=FailureKind.rejection, reason=exc.reason, stage="ticket",
                                              message=exc.message))
        try:
            self._post("refusal", f"/v1/jobs/{job_id}/status",
                       lambda: seal(self.hotkey, "job_status", report, clock=self.clock), patience_s=30)
        except (Refused, ServiceUnavailable) as err:
            log.warning("refusal of ticket %s not recorded: %s", ticket_id, err)

    # ---------------------------------------------------------------- running
    def _status(self, ticket: Ticket, status: JobStatus, detail: str = "") -> None:
        report = StatusReport(ticket_id=ticket.ticket_id, attempt=ticket.attempt, status=status, detail=detail)
        try:
            self._post(f"status {status.value}", f"/v1/jobs/{ticket.job_id}/status",
                       lambda: seal(self.hotkey, "job_status", report, clock=self.clock), patience_s=30)
        except (Refused, ServiceUnavailable) as exc:  # progress is best effort; the signed result is what counts
            log.warning("status %s for %s not recorded: %s", status.value, ticket.ticket_id, exc)

    def _execute(self, ticket: Ticket, spec: JobSpec) -> JobResult:
        """Walk the stages: volumes download -> execution -> upload, each with its own limit."""
        cls = self.classes[ticket.executor_class]
        base = dict(job_id=ticket.job_id, ticket_id=ticket.ticket_id, attempt=ticket.attempt,
                    miner_hotkey=self.hotkey.ss58)

        def failed(kind: FailureKind, reason: str, stage: str, message: str) -> JobResult:
            status = "failed" if kind == FailureKind.job_failure else "horde_failed"
            return JobResult(**base, status=status, failure=Failure(kind=kind, reason=reason, stage=stage,
                                                                    message=message))

        self._status(ticket, JobStatus.accepted)
        workdir = self.home / "jobs" / ticket.ticket_id
        artifacts, output, volume = workdir / "artifacts", workdir / "output", workdir / "volume"
        mounted: list[Path] = []
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            try:  # sized tmpfs: a job writing past the cap gets ENOSPC while it runs, not a check afterwards
                for path, size_mb in ((output, cls.output_max_mb), (artifacts, -(-cls.artifacts_max_bytes // 2**20))):
                    mount_tmpfs(path, size_mb)
                    mounted.append(path)
            except OSError as exc:
                return failed(FailureKind.horde_failure, "executor_spinup_failed", "volumes", str(exc))

            try:
                self.runtime.pull(spec.image, timeout_s=min(spec.image_pull_timeout_s, cls.max_image_pull_s),
                                  auth=spec.registry_auth.model_dump() if spec.registry_auth else None)
            except ImagePullFailed as exc:
                return failed(FailureKind.job_failure, exc.reason, "image_pull", exc.message)
            except EngineError as exc:
                return failed(FailureKind.horde_failure, "executor_failed", "image_pull", str(exc))

            if spec.volumes:
                limits = VolumeLimits(max_download_bytes=cls.volume_max_download_bytes,
                                      max_unpacked_bytes=cls.volume_max_unpacked_bytes,
                                      max_files=cls.volume_max_files,
                                      allow_private_networks=self.allow_private_networks)
                try:
                    prepared = prepare_volumes(spec.volumes, volume, limits=limits, hf_endpoint=self.hf_endpoint,
                                               deadline_s=min(spec.download_timeout_s, cls.max_download_s))
                except VolumeError as exc:
                    kind = FailureKind.horde_failure if exc.reason == "miner_io_error" else FailureKind.job_failure
                    reason = "download_failed" if exc.reason == "timeout" else exc.reason
                    return failed(kind, reason, "download", exc.message)
                self._status(ticket, JobStatus.volumes_ready, detail=", ".join(
                    f"{p.path}: {p.files} files, {p.unpacked_bytes} bytes" for p in prepared))

            run = ContainerRun(image=spec.image, command=spec.command, env=spec.env, user=self.image_user,
                               memory_mb=cls.memory_mb, cpus_milli=cls.cpus_milli, pids=cls.pids, tmp_mb=cls.tmp_mb,
                               gpus=cls.gpus, timeout_s=min(spec.execution_timeout_s, cls.max_execution_s),
                               artifacts_host_dir=artifacts, artifacts_dir=spec.artifacts_dir,
                               output_host_dir=output, volume_host_dir=volume if spec.volumes else None,
                               log_max_bytes=cls.log_max_bytes,
                               labels={AGENT_LABEL: self.hotkey.ss58, "rayhorde.ticket": ticket.ticket_id,
                                       "rayhorde.job": ticket.job_id})
            self._status(ticket, JobStatus.executor_ready)
            try:
                out = self.runtime.run(run)
            except ImageUnavailable as exc:
                return failed(FailureKind.job_failure, getattr(exc, "reason", "image_pull_failed"), "image_pull",
                              str(exc))
            except GpuUnsupported as exc:
                return failed(FailureKind.horde_failure, exc.reason, "execution", exc.message)
            except EngineError as exc:
                return failed(FailureKind.horde_failure, "executor_failed", "execution", str(exc))
            self._status(ticket, JobStatus.execution_done)
            files, omitted = collect_artifacts(artifacts, spec.artifacts_dir, per_file_max=cls.artifact_file_max_bytes,
                                               total_max=cls.artifacts_max_bytes)
            result = JobResult(**base, **_verdict(out, cls, ticket.executor_class), stdout=out.stdout,
                               stderr=out.stderr, stdout_truncated=out.stdout_truncated,
                               stderr_truncated=out.stderr_truncated, artifacts=files, artifacts_omitted=omitted,
                               started_ns=out.started_ns, finished_ns=out.finished_ns)
            if spec.uploads and result.status == "completed":
                try:
                    responses = upload_outputs(spec.uploads, output,
                                               deadline_s=min(spec.upload_timeout_s, cls.max_upload_s),
                                               still_current=lambda: self._still_current(ticket),
                                               scratch_dir=workdir, allow_private_networks=self.allow_private_networks)
                except UploadError as exc:
                    if exc.reason == "superseded":
                        raise TicketRefused("ticket_closed", f"ticket {ticket.ticket_id} was superseded before its "
                                            "upload; nothing was uploaded") from exc
                    kind = FailureKind.horde_failure if exc.reason == "miner_io_error" else FailureKind.job_failure
                    reason = "upload_failed" if exc.reason in ("upload_failed", "timeout") else exc.reason
                    return result.model_copy(update={"status": "failed" if kind == FailureKind.job_failure
                                                     else "horde_failed",
                                                     "failure": Failure(kind=kind, reason=reason, stage="upload",
                                                                        message=exc.message)})
                result = result.model_copy(update={"uploads": responses})
            return result
        finally:
            for path in mounted:
                unmount(path)
            shutil.rmtree(workdir, ignore_errors=True)

    def _still_current(self, ticket: Ticket) -> bool:
        answer = self.validator.post_signed("/v1/tickets/current", seal(
            self.hotkey, "ticket_current", TicketFetch(ticket_id=ticket.ticket_id), clock=self.clock))
        return bool(answer.get("current"))

    def kill_tickets(self, ticket_ids: list[str]) -> int:
        """Kill the containers of tickets validator-core says are no longer ours to run."""
        return sum(self.runtime.kill_labelled("rayhorde.ticket", t) for t in ticket_ids)

    def kill_all(self) -> int:
        """Kill every container this agent started (shutdown, or its Ray node died)."""
        return self.runtime.kill_labelled(AGENT_LABEL, self.hotkey.ss58)

    def clean_leftovers(self) -> list[str]:
        """Remove the job dirs (and their tmpfs mounts) a killed predecessor left behind."""
        left = []
        for workdir in sorted((self.home / "jobs").glob("*")):
            for sub in ("output", "artifacts"):
                if (workdir / sub).is_mount():
                    unmount(workdir / sub)
            shutil.rmtree(workdir, ignore_errors=True)
            left.append(workdir.name)
        return left


def _verdict(out: ContainerOutcome, cls: ExecutorClass, class_name: str) -> dict[str, Any]:
    if out.timed_out:
        return {"status": "failed", "exit_code": out.exit_code, "failure": Failure(
            kind=FailureKind.job_failure, reason="timeout", stage="execution", exit_code=out.exit_code,
            message="killed at the execution deadline")}
    if out.oom_killed:
        return {"status": "failed", "exit_code": out.exit_code, "failure": Failure(
            kind=FailureKind.job_failure, reason="out_of_memory", stage="execution", exit_code=out.exit_code,
            oom_killed=True, message=f"OOMKilled: the job exceeded the {cls.memory_mb} MB memory limit of "
                                     f"{class_name} (exit {out.exit_code})")}
    if out.exit_code != 0:
        return {"status": "failed", "exit_code": out.exit_code, "failure": Failure(
            kind=FailureKind.job_failure, reason="nonzero_return_code", stage="execution", exit_code=out.exit_code,
            message=f"the job's command exited with {out.exit_code}")}
    return {"status": "completed", "exit_code": 0}


_libc = ctypes.CDLL(None, use_errno=True)
_MS_NOSUID, _MS_NODEV, _MNT_DETACH = 2, 4, 2


def mount_tmpfs(path: Path, size_mb: int) -> None:
    """A tmpfs of ``size_mb`` at ``path``, writable by the job's unprivileged uid (needs root).

    mount(2) directly: spawning mount/umount for every job cost ~20-40 ms of CPU per job."""
    path.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"rayhorde-job", str(path).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                   f"size={size_mb}m,mode=0777".encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount a {size_mb} MB tmpfs at {path} (the agent needs root for size caps): "
                           f"{os.strerror(err)}")


def unmount(path: Path) -> None:
    _libc.umount2(str(path).encode(), _MNT_DETACH)


def collect_artifacts(root: Path, mount: str, *, per_file_max: int, total_max: int) -> tuple[dict[str, str], list[str]]:
    """Regular files under ``root`` as {"<mount>/<rel>": base64}; links and files over the caps are omitted."""
    files: dict[str, str] = {}
    omitted: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            key = f"{mount}/{path.relative_to(root).as_posix()}"
            st = path.lstat()
            if not path.is_file() or path.is_symlink() or st.st_size > per_file_max or total + st.st_size > total_max:
                omitted.append(key)
                continue
            data = path.read_bytes()[:per_file_max]
            total += len(data)
            files[key] = base64.b64encode(data).decode()
    return files, omitted
