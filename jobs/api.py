"""The public surface of ``jobs``: what a driver script needs to run organic jobs."""

from jobs._private.client import JobHandle, JobNotFinished, submit
from cluster.protocol.jobs import Failure, FailureKind, JobResult, JobSpec, JobStatus, JobView, StatusEvent

__all__ = [
    "Failure",
    "FailureKind",
    "JobHandle",
    "JobNotFinished",
    "JobResult",
    "JobSpec",
    "JobStatus",
    "JobView",
    "StatusEvent",
    "submit",
]
