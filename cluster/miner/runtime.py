"""The container runtime interface a miner agent runs jobs with (one implementation per module).

What an implementation cannot do is stated in :attr:`ContainerRuntime.features`; the agent
refuses a job that needs a feature its runtime lacks instead of running it unconfined.
"""

from __future__ import annotations

import abc
import enum
from pathlib import Path

from pydantic import BaseModel, Field


class RuntimeFeature(enum.Flag):
    NO_NETWORK = enum.auto()
    READ_ONLY_ROOT = enum.auto()
    MEMORY_LIMIT = enum.auto()
    CPU_LIMIT = enum.auto()
    PIDS_LIMIT = enum.auto()
    DROP_CAPABILITIES = enum.auto()
    GPU = enum.auto()


REQUIRED = (RuntimeFeature.NO_NETWORK | RuntimeFeature.READ_ONLY_ROOT | RuntimeFeature.MEMORY_LIMIT
            | RuntimeFeature.CPU_LIMIT | RuntimeFeature.PIDS_LIMIT | RuntimeFeature.DROP_CAPABILITIES)
"""Every organic (untrusted) job container is confined in all of these ways; a runtime that cannot do one of
them is refused."""


class ContainerRun(BaseModel):
    image: str
    command: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    user: str = "65534:65534"
    memory_mb: int
    cpus_milli: int
    pids: int
    tmp_mb: int = 64
    gpus: int = 0
    timeout_s: float
    artifacts_host_dir: Path
    artifacts_dir: str = "/artifacts"
    output_host_dir: Path | None = None  # mounted read-write at /output
    volume_host_dir: Path | None = None  # mounted read-only at /volume
    log_max_bytes: int
    labels: dict[str, str] = Field(default_factory=dict)


class ContainerOutcome(BaseModel):
    exit_code: int | None
    oom_killed: bool = False
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    started_ns: int = 0
    finished_ns: int = 0


class ContainerRuntime(abc.ABC):
    features: RuntimeFeature

    @abc.abstractmethod
    def run(self, run: ContainerRun) -> ContainerOutcome:
        """Run to completion or to ``timeout_s`` (then kill); always remove the container."""

    @abc.abstractmethod
    def pull(self, image: str, *, timeout_s: float, auth: dict[str, str] | None = None) -> str:
        """Make ``image`` present (pull it if absent; a digest is checked); return its local id."""

    @abc.abstractmethod
    def kill_labelled(self, label: str, value: str) -> int:
        """Kill and remove every container carrying ``label=value``; return how many."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise if the engine does not answer."""
