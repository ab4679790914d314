"""Messages between validator-core, miner agents and users (payloads of signed envelopes).

Each model is the payload of one envelope ``kind`` (see :data:`KINDS`) or a plain response.
Times are Unix ns (``*_ns``), durations seconds (``*_s``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from cluster.protocol.jobs import Failure, JobResult, JobSpec, JobStatus
from cluster.protocol.streams import StreamReady
from cluster.protocol.numbers import INT64_MAX, Attempt, Count, Port
from cluster.protocol.receipts import Receipt


class ChallengeRequest(BaseModel):
    miner_hotkey: str = Field(max_length=64)


class Challenge(BaseModel):
    nonce: str
    validator_hotkey: str
    expires_ns: int


class JoinRequest(BaseModel):  # kind "admission_join", signed by the miner
    validator: str
    challenge: str
    executor_classes: dict[str, Count] = Field(max_length=64)
    proxy_url: str = ""
    versions: dict[str, str]


class JoinAccepted(BaseModel):
    gcs_address: str
    ray_token: str
    resources: dict[str, float]
    heartbeat_interval_s: float
    validator_hotkey: str
    serve_http_port: int = 0  # every node's Serve HTTP proxy listens on 127.0.0.1:<this>


class Preflight(BaseModel):  # kind "admission_preflight", signed by the miner (`rayhorde miner check`)
    validator: str
    address: str  # the miner host's address, as validator-core sees the request come from it
    ports: list[Port] = Field(default_factory=list, max_length=16)  # TCP ports validator-core tries to reach there


class PreflightAnswer(BaseModel):
    registered: bool
    banned: bool
    detail: str = ""  # why not, when registered is false or banned true
    reachable: dict[int, bool] = Field(default_factory=dict)  # port -> validator-core connected within the timeout
    connect_timeout_s: float = 0
    validator_time_ns: int = 0


class NodeStarted(BaseModel):  # kind "node_started", signed by the miner
    node_id: str


class NodeLost(BaseModel):  # kind "node_lost", signed by the miner: its Ray node died under it
    node_id: str
    running_tickets: list[str] = Field(default_factory=list)


class Heartbeat(BaseModel):  # kind "heartbeat", signed by the miner
    running_tickets: list[str] = Field(default_factory=list)


class CapabilityRequest(BaseModel):  # kind "capability_request", signed by the user
    validator: str
    max_jobs: int = Field(gt=0, le=100_000)
    ttl_s: int = Field(gt=0, le=10 * 365 * 86400)


class Capability(BaseModel):  # kind "capability", signed by the validator
    """What a user may start. ``scope`` narrows it for a Ray driver, whose token sits where every
    cluster member can read it (a Ray job's runtime env): ``submission`` (minted by the Jobs
    gateway for one ``ray job submit``) may start jobs on its parent's budget and see only those;
    ``job`` (minted for ``rayhorde job run``) may only follow and cancel job ``job_id``. Neither
    reaches streams, the user's other jobs, or the gateway."""
    capability_id: str
    user: str
    max_jobs: int
    expires_ns: int
    scope: Literal["user", "submission", "job"] = "user"
    parent_id: str | None = None  # the user capability a scope was minted from
    submission_id: str | None = None  # scope "submission": the Ray job it was minted for
    job_id: str | None = None  # scope "job": the one job it follows


class Ticket(BaseModel):  # kind "ticket", signed by the validator
    ticket_id: str
    job_id: str
    attempt: int
    miner: str
    executor_class: str
    expires_ns: int


class TicketFetch(BaseModel):  # kind "ticket_fetch", signed by the miner
    ticket_id: str


class SpecGrant(BaseModel):  # kind "job_spec", signed by the validator
    ticket_id: str
    job_id: str
    spec: JobSpec


class StatusReport(BaseModel):  # kind "job_status", signed by the miner
    ticket_id: str
    attempt: Attempt
    status: JobStatus
    detail: str = ""
    failure: Failure | None = None


class ReceiptsPull(BaseModel):  # kind "receipts_pull", signed by the validator: a page of a job's receipts
    job_id: str
    after_seq: int = Field(ge=-1, le=INT64_MAX, default=-1)
    limit: int = Field(gt=0, le=1000, default=100)


class ReceiptRecord(BaseModel):  # one answer as a miner's proxy keeps it, in a ReceiptsPage
    receipt: Receipt
    request_b64: str  # the request body as the job received it
    response_b64: str  # the response body as the job sent it
    envelope_b64: str  # the client's signed request envelope (its sha256 is the request id)
    client_sig: str


class ReceiptsPage(BaseModel):  # the proxy's answer to a receipts_pull: at most ``limit`` records, seq order
    job_id: str
    receipts: list[ReceiptRecord]


KINDS = {
    "admission_join": JoinRequest,
    "admission_preflight": Preflight,
    "node_started": NodeStarted,
    "heartbeat": Heartbeat,
    "node_lost": NodeLost,
    "capability_request": CapabilityRequest,
    "capability": Capability,
    "ticket": Ticket,
    "ticket_fetch": TicketFetch,
    "ticket_current": TicketFetch,
    "job_spec": SpecGrant,
    "job_status": StatusReport,
    "job_result": JobResult,
    "stream_ready": StreamReady,
    "receipts_pull": ReceiptsPull,
}


def miner_resource(hotkey: str) -> str:
    return f"miner:{hotkey}"


def executor_resource(executor_class: str) -> str:
    return f"executor:{executor_class}"


def node_resources(hotkey: str, executor_classes: dict[str, int]) -> dict[str, float]:
    """The custom resources an admitted miner's Ray node carries: its ``miner:`` marker and one
    ``executor:`` unit per executor it offers (what the join answers, and what Ray must show)."""
    return {miner_resource(hotkey): 1.0, **{executor_resource(c): float(n) for c, n in executor_classes.items()}}
