"""What a user sends (:class:`JobSpec`) and reads back (:class:`JobView`, :class:`JobResult`).

These cross trust boundaries (user -> validator-core -> agent -> validator-core -> user), so
each is a strict pydantic model with units in field names; new fields get defaults. The
vocabulary (statuses, failure reasons, stages, executor class names) is the one users of the
peer compute market already know, kept so their specs and scripts carry over.
"""

from __future__ import annotations

import base64
import enum
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.protocol.job_io import Upload, UploadResponse, Volume, check_volume_layout
from cluster.protocol.numbers import Attempt, ExitCode, Finite, UnixNs

# What a Ray driver reads to reach validator-core (``jobs.submit``); the Jobs gateway sets them
VALIDATOR_URL_ENV = "RAYHORDE_VALIDATOR_URL"
CAPABILITY_ENV = "RAYHORDE_CAPABILITY"  # a driver's scope, never the user's capability
# What a miner's Ray node holds: the path of its agent's executor socket (tickets, stream volumes)
AGENT_SOCKET_ENV = "RAYHORDE_AGENT_SOCKET"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class JobStatus(str, enum.Enum):
    received = "received"
    accepted = "accepted"
    executor_ready = "executor_ready"
    volumes_ready = "volumes_ready"
    streaming_ready = "streaming_ready"
    execution_done = "execution_done"
    completed = "completed"
    rejected = "rejected"
    failed = "failed"
    horde_failed = "horde_failed"
    cancelled = "cancelled"  # by its user

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.completed, JobStatus.rejected, JobStatus.failed, JobStatus.horde_failed,
                        JobStatus.cancelled)


class FailureKind(str, enum.Enum):
    job_failure = "job_failure"  # the job's own fault: timeout, nonzero_return_code, ...
    horde_failure = "horde_failure"  # infrastructure's fault: executor_spinup_failed, ...
    rejection = "rejection"  # refused before running: busy, invalid_signature, no_miner_for_job


class Failure(BaseModel):
    kind: FailureKind
    reason: str
    stage: str | None = None
    exit_code: ExitCode | None = None
    oom_killed: bool = False
    message: str = ""
    reporter: str | None = None  # hotkey of whoever reported it


class RegistryAuth(BaseModel):
    """Credentials for a private registry (prefer a read-only token: it travels in the signed spec)."""

    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=8192, repr=False)


class JobSpec(BaseModel):
    """A user's organic job: an image, a command, environment and limits."""

    model_config = ConfigDict(extra="forbid")
    v: int = Field(default=1, ge=1, le=1)
    image: str = Field(min_length=1, max_length=512, pattern=r"^[^\s]+$")
    command: list[str] = Field(min_length=1, max_length=256)
    env: dict[str, str] = Field(default_factory=dict, max_length=128)
    executor_class: str = Field(default="always_on.test", min_length=1, max_length=128)
    execution_timeout_s: int = Field(default=60, gt=0, le=86400)
    max_wait_s: int = Field(default=300, ge=0, le=86400,
                            description="how long the job may wait for a free executor; 0 = reject at once")
    artifacts_dir: Literal["/artifacts"] = "/artifacts"
    volumes: list[Volume] = Field(default_factory=list, max_length=32, description="mounted read-only at /volume/")
    uploads: list[Upload] = Field(default_factory=list, max_length=64, description="files under /output/ to send")
    download_timeout_s: int = Field(default=300, gt=0, le=86400)
    upload_timeout_s: int = Field(default=300, gt=0, le=86400)
    image_pull_timeout_s: int = Field(default=300, gt=0, le=86400)
    registry_auth: RegistryAuth | None = None

    @model_validator(mode="after")
    def _volume_layout(self) -> "JobSpec":
        check_volume_layout(self.volumes)
        return self

    def stage_limits_s(self) -> int:
        """Every stage's limit together: what validator-core allows a fetched attempt (+ leeway)."""
        return self.image_pull_timeout_s + self.download_timeout_s + self.execution_timeout_s + self.upload_timeout_s

    @field_validator("command")
    @classmethod
    def _command_items(cls, value: list[str]) -> list[str]:
        if any(len(item) > 8192 or "\x00" in item for item in value):
            raise ValueError("each command item must be at most 8192 characters, without NUL")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment name {name!r} is not a valid variable name")
            if len(item) > 32768 or "\x00" in item:
                raise ValueError(f"environment value of {name} must be at most 32768 characters, without NUL")
        return value


class JobResult(BaseModel):
    """What the miner ran and saw; the agent signs it with the miner hotkey."""

    job_id: str
    ticket_id: str
    attempt: Attempt = Field(ge=1)
    miner_hotkey: str
    status: Literal["completed", "failed", "horde_failed"]
    exit_code: ExitCode | None = None
    failure: Failure | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    artifacts: dict[str, str] = Field(default_factory=dict, description="path -> base64 bytes")
    artifacts_omitted: list[str] = Field(default_factory=list, description="over the size caps")
    uploads: list[UploadResponse] = Field(default_factory=list)
    started_ns: UnixNs = 0
    finished_ns: UnixNs = 0


class StatusEvent(BaseModel):
    status: JobStatus
    t_ns: int
    attempt: int = 0
    reporter: str = "validator"
    detail: str = ""


class TicketRef(BaseModel):
    """What a driver needs to launch the organic task for one attempt: ids and resources only."""

    ticket_id: str
    attempt: int
    miner_hotkey: str
    executor_class: str
    resources: dict[str, float]


class JobState(BaseModel):
    """The compact state a driver follows: final or not, and the ticket to launch."""

    job_id: str
    status: JobStatus
    ticket: TicketRef | None = None


class JobView(BaseModel):
    """A job as its user sees it, read from validator-core."""

    job_id: str
    status: JobStatus
    executor_class: str
    miner_hotkey: str | None = None
    attempt: int = 0
    created_ns: int
    ticket: TicketRef | None = None
    history: list[StatusEvent] = Field(default_factory=list)
    result: JobResult | None = None
    failure: Failure | None = None

    def artifact(self, path: str) -> bytes:
        """The bytes of artifact ``path`` (e.g. ``/artifacts/stuff``)."""
        if self.result is None or path not in self.result.artifacts:
            have = sorted(self.result.artifacts) if self.result else []
            raise KeyError(f"no artifact {path!r} in job {self.job_id}; artifacts: {have}")
        return base64.b64decode(self.result.artifacts[path])


class Submitted(BaseModel):
    """validator-core's answer to a submission: the ticket to launch, or why the job waits."""

    job_id: str
    ticket: TicketRef | None = None
    queue_reason: str = ""


MAX_WAIT_S = 30  # the longest a client may hold a long-poll open
WATCH_MAX_JOBS = 1000  # jobs one watch request may follow


class WatchRequest(BaseModel):
    """A driver's long-poll over its jobs (``POST /v1/jobs/watch``): job id -> the ticket id it
    last saw (null: none yet). Answered as soon as one is final or has another ticket."""

    model_config = ConfigDict(extra="forbid")
    known: dict[str, str | None] = Field(max_length=WATCH_MAX_JOBS)
    wait_s: Finite = Field(default=0, ge=0, le=MAX_WAIT_S)
