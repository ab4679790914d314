"""Messages of the streaming lifecycle: what crosses between a client,
validator-core and a miner agent. Times are Unix ns (``*_ns``), durations seconds (``*_s``).

    client --StreamSpec-->  validator-core  (capability)         -> StreamView (status accepted)
    validator-core --Serve REST--> the app, pinned to the miner's node, route /jobs/<job_id>
    agent  --heartbeat-->   validator-core  -> [StreamAssignment]  (the streams placed on it)
    agent  --StreamReady (signed by the miner hotkey)--> validator-core -> status streaming_ready
    client <--StreamView (with the signed readiness)-- validator-core
    the app --VolumeRead (signed by the job key)--> the agent's executor socket -> the file's bytes
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cluster.protocol.canonical import canonical_bytes
from cluster.protocol.jobs import Failure, JobStatus, StatusEvent
from cluster.protocol.keys import PublicKey
from cluster.protocol.numbers import Finite, UnixNs

READY_KIND = "stream_ready"  # envelope kind of the readiness message
VOLUME_READ_PATH = "/v1/stream-volume"  # on the agent's executor socket
FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a file of a streaming job's volume


class StreamSpec(BaseModel):
    """What a client asks for: a whitelisted app, where, for whom, for how long."""

    model_config = ConfigDict(extra="forbid")
    app: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=32)
    executor_class: str = "always_on.test"
    client_keys: list[PublicKey] = Field(min_length=1, max_length=16)
    max_duration_s: int = Field(gt=0, le=365 * 86400, default=3600, description="the job ends (completed) this long after it is placed")
    options: dict[str, Finite | int | str | bool] = Field(default_factory=dict,
                                                         description="app options the whitelist entry allows")


class StreamView(BaseModel):
    """A streaming job as validator-core records it."""

    job_id: str
    status: JobStatus
    app: str
    version: str
    executor_class: str
    miner_hotkey: str | None = None
    route_prefix: str
    created_ns: int
    deadline_ns: int | None = None
    readiness: dict | None = Field(default=None, description="the miner-signed readiness envelope (kind stream_ready)")
    failure: Failure | None = None
    history: list[StatusEvent] = Field(default_factory=list)


class StreamReady(BaseModel):  # kind "stream_ready", signed by the miner hotkey
    """The readiness message: binds the job key to the miner and its proxy. validator-core stores
    it and hands it to clients, who check every receipt's job key against it."""

    job_id: str
    job_key: PublicKey
    proxy_url: str
    weights_sha256: str | None = None


class StreamAssignment(BaseModel):
    """In a heartbeat answer: a streaming job placed on this miner (its proxy must serve it)."""

    job_id: str
    route_prefix: str
    client_keys: list[PublicKey]
    deadline_ns: int
    ready: bool = False  # validator-core already holds this job's readiness


class VolumeRead(BaseModel):
    """A streaming app asks its miner's agent for a file of its job's volume. Every Ray process of
    the node runs as one user, so the volumes are kept where none of them can read: only a request
    signed by the job's key (which never leaves the app, and which readiness bound to the job)
    gets a job's file."""

    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    name: str = Field(pattern=FILE_NAME_PATTERN)
    t_ns: UnixNs
    job_sig: str = ""

    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.model_dump(exclude={"job_sig"}))
