"""The public surface of ``jobs``: what a driver script needs to run organic jobs."""

from cluster.errors import JobNotFinished
from cluster.protocol.jobs import Failure, FailureKind, JobResult, JobSpec, JobStatus, JobView, StatusEvent
from jobs._private.client import JobHandle, follow, submit

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
    "follow",
    "submit",
]
