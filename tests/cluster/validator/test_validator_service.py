"""ValidatorCore's database paths on SQLite and PostgreSQL, driven directly (no HTTP, Ray or docker).

Real sr25519 keys: Alice is the validator, Bob and Charlie miners (both in the metagraph), Dave
the whitelisted user. Every envelope is sealed with the test's clock, which the tests advance.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa

from cluster.protocol.canonical import NS
from cluster.chain.local import LocalChain
from cluster.protocol.envelope import SignedEnvelope, open_envelope, seal
from cluster.protocol.identity import Hotkey
from cluster.protocol.messages import (
    Capability, CapabilityRequest, ChallengeRequest, Heartbeat, JoinRequest, NodeLost, NodeStarted, StatusReport,
    TicketFetch,
)
from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.core import ValidatorCore
from cluster.protocol.version import local_versions
from cluster.errors import AdmissionRefused, CapabilityRefused, Refused, SignatureRejected, TicketRefused
from cluster.protocol.jobs import JobResult, JobSpec, JobStatus

REPO = Path(__file__).resolve().parents[3]
ALICE, BOB, CHARLIE, DAVE, EVE = (Hotkey.from_uri(u) for u in ("//Alice", "//Bob", "//Charlie", "//Dave", "//Eve"))
CLASS = "always_on.test"


class Clock:
    """Unix ns that move 1 µs per read (no ties in ``created_ns``) and jump on :meth:`advance`."""

    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        self.now += 1000
        return self.now

    def advance(self, s: float) -> None:
        self.now += int(s * NS)


def node_of(miner: Hotkey) -> str:
    """The Ray node id (56 hex digits) the harness's ``miner`` reports."""
    return hashlib.sha224(miner.ss58.encode()).hexdigest()


class Harness:
    def __init__(self, tmp: Path, db_url: str) -> None:
        self.clock = Clock()
        shutil.copy(REPO / "configs" / "metagraph.local.json", tmp / "metagraph.json")  # Alice, Bob, Charlie
        self.settings = ValidatorSettings(home=tmp, wallet_path=tmp, db_url=db_url, users=[DAVE.ss58],
                                          metagraph_path=tmp / "metagraph.json",
                                          executor_classes_path=REPO / "configs" / "executor_classes.toml")
        self.cores: list[ValidatorCore] = []
        self.core = self.restart()

    def restart(self) -> ValidatorCore:
        """A new ValidatorCore on the same database, as after a validator-core restart."""
        self.cores.append(ValidatorCore(self.settings, hotkey=ALICE, chain=LocalChain(self.settings.metagraph_path),
                                        ray_token="token", clock=self.clock))
        self.core = self.cores[-1]
        return self.core

    def seal(self, who: Hotkey, kind: str, payload) -> SignedEnvelope:
        return seal(who, kind, payload, clock=self.clock)

    def admit(self, miner: Hotkey, executors: int = 1, *, node: bool = True):
        ch = self.core.admission.challenge(ChallengeRequest(miner_hotkey=miner.ss58))
        join = self.seal(miner, "admission_join", JoinRequest(validator=ALICE.ss58, challenge=ch.nonce,
                                                              executor_classes={CLASS: executors},
                                                              versions=local_versions()))
        accepted = self.core.admission.join(join)
        if node:
            started = NodeStarted(node_id=node_of(miner))
            self.core.admission.node_started(self.seal(miner, "node_started", started))
        return ch, join, accepted

    def capability(self, user: Hotkey = DAVE, max_jobs: int = 100) -> Capability:
        req = CapabilityRequest(validator=ALICE.ss58, max_jobs=max_jobs, ttl_s=3600)
        return self.core.capabilities.check(self.core.capabilities.issue(self.seal(user, "capability_request", req)))

    def submit(self, cap: Capability, max_wait_s: int = 300):
        spec = JobSpec(image="rayhorde/busybox:local", command=["echo", "hi"], executor_class=CLASS,
                       max_wait_s=max_wait_s)
        return self.core.organic.register(cap, spec)

    def fetch(self, miner: Hotkey, ticket_id: str) -> dict:
        return self.core.organic.fetch_ticket(self.seal(miner, "ticket_fetch", TicketFetch(ticket_id=ticket_id)))

    def status(self, miner: Hotkey, job_id: str, ticket, status: JobStatus) -> None:
        rep = StatusReport(ticket_id=ticket.ticket_id, attempt=ticket.attempt, status=status, detail=status.value)
        self.core.organic.report_status(job_id, self.seal(miner, "job_status", rep))

    def result(self, miner: Hotkey, job_id: str, ticket) -> SignedEnvelope:
        res = JobResult(job_id=job_id, ticket_id=ticket.ticket_id, attempt=ticket.attempt, miner_hotkey=miner.ss58,
                        status="completed", exit_code=0, stdout="hi\n", artifacts={"/artifacts/x": "aGk="})
        env = self.seal(miner, "job_result", res)
        self.core.organic.report_result(job_id, env)
        return env

    def incidents(self) -> list[tuple[str, str, str, int]]:
        with self.core.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.select(
                db.incidents.c.miner_hotkey, db.incidents.c.kind, db.incidents.c.reason, db.incidents.c.attempt))]


@pytest.fixture
def h(tmp_path: Path, db_url: str) -> Iterator[Harness]:
    harness = Harness(tmp_path, db_url)
    yield harness
    for core in harness.cores:
        core.engine.dispose()


def by_hotkey(ss58: str) -> Hotkey:
    return {k.ss58: k for k in (BOB, CHARLIE)}[ss58]


def refused(exc_type, reason: str, fn, *args) -> Refused:
    with pytest.raises(exc_type) as err:
        fn(*args)
    assert err.value.reason == reason, err.value
    return err.value


# ---------------------------------------------------------------------------- admission, capabilities
def test_admission_then_capability_budget(h):
    ch, join, accepted = h.admit(BOB, executors=2)
    assert accepted.resources == {f"miner:{BOB.ss58}": 1.0, f"executor:{CLASS}": 2.0}
    assert accepted.ray_token == "token" and accepted.validator_hotkey == ALICE.ss58
    refused(SignatureRejected, "replayed", h.core.admission.join, join)  # the same envelope again
    again = JoinRequest(validator=ALICE.ss58, challenge=ch.nonce, executor_classes={CLASS: 1},
                        versions=local_versions())
    refused(AdmissionRefused, "bad_challenge", h.core.admission.join,
            h.seal(BOB, "admission_join", again))  # single use
    ch_eve = h.core.admission.challenge(ChallengeRequest(miner_hotkey=EVE.ss58))
    eve = JoinRequest(validator=ALICE.ss58, challenge=ch_eve.nonce, executor_classes={CLASS: 1},
                      versions=local_versions())
    refused(AdmissionRefused, "not_registered", h.core.admission.join, h.seal(EVE, "admission_join", eve))
    [miner] = h.core.cluster_status()["miners"]
    assert (miner["hotkey"], miner["node_id"], miner["executor_classes"]) == (BOB.ss58, node_of(BOB),
                                                                              {CLASS: 2})

    req = CapabilityRequest(validator=ALICE.ss58, max_jobs=2, ttl_s=60)
    refused(CapabilityRefused, "not_whitelisted", h.core.capabilities.issue, h.seal(EVE, "capability_request", req))
    cap = h.capability(max_jobs=2)
    assert cap.user == DAVE.ss58 and cap.max_jobs == 2
    h.submit(cap)
    h.submit(cap)
    refused(CapabilityRefused, "over_budget", h.submit, cap)


# ---------------------------------------------------------------------------- queue, tickets, results
def test_ticket_queue_fetch_report_and_dispatch_next(h):
    h.admit(BOB)  # one executor
    h.admit(CHARLIE, node=False)  # admitted, but no Ray node yet: no capacity
    cap = h.capability()
    first = h.submit(cap)
    assert first.ticket is not None and first.ticket.miner_hotkey == BOB.ss58 and first.ticket.attempt == 1
    assert first.ticket.resources == {f"miner:{BOB.ss58}": 0.001, f"executor:{CLASS}": 1.0}
    second = h.submit(cap)
    assert second.ticket is None and second.queue_reason == f"0 of 1 {CLASS} executors free on live admitted " \
                                                            "miners; 0 jobs ahead"
    err = refused(Refused, "no_miner_for_job", h.submit, cap, 0)  # max_wait_s=0: rejected at once
    rejected = [j for j in h.core.organic.list(cap) if j.status == JobStatus.rejected]
    assert len(rejected) == 1 and rejected[0].failure.reason == "no_miner_for_job" and "1 jobs ahead" in err.message

    refused(TicketRefused, "wrong_miner", h.fetch, CHARLIE, first.ticket.ticket_id)
    grant = h.fetch(BOB, first.ticket.ticket_id)
    ticket = open_envelope(SignedEnvelope.model_validate(grant["ticket"]), kind="ticket", max_skew_s=0,
                           signers=[ALICE.ss58], check_time=False)
    spec = open_envelope(SignedEnvelope.model_validate(grant["spec"]), kind="job_spec", max_skew_s=5,
                         signers=[ALICE.ss58], clock=h.clock)
    assert ticket["miner"] == BOB.ss58 and spec["spec"]["command"] == ["echo", "hi"]

    h.status(BOB, first.job_id, first.ticket, JobStatus.accepted)
    h.status(BOB, first.job_id, first.ticket, JobStatus.executor_ready)
    result_env = h.result(BOB, first.job_id, first.ticket)
    refused(SignatureRejected, "replayed", h.core.organic.report_result, first.job_id, result_env)
    refused(TicketRefused, "ticket_closed", h.result, BOB, first.job_id, first.ticket)  # a fresh envelope, too late

    done = h.core.organic.get(cap, first.job_id)
    assert done.status == JobStatus.completed and done.result.stdout == "hi\n"
    assert done.artifact("/artifacts/x") == b"hi"
    assert [e.status for e in done.history] == [JobStatus.received, JobStatus.received, JobStatus.accepted,
                                                JobStatus.executor_ready, JobStatus.completed]
    nxt = h.core.organic.get(cap, second.job_id)  # the freed executor went to the queued job
    assert nxt.status == JobStatus.received and nxt.ticket.miner_hotkey == BOB.ss58 and nxt.ticket.attempt == 1
    assert [e.detail for e in nxt.history][1].startswith("queued: 0 of 1")
    assert h.core.cluster_status()["jobs"] == {"completed": 1, "received": 1, "rejected": 1}


# ---------------------------------------------------------------------------- lost attempts
def test_node_lost_retires_a_fabric_incident_and_reticketes_to_the_other_miner(h):
    h.admit(BOB), h.admit(CHARLIE)
    cap = h.capability()
    sub = h.submit(cap)
    first = by_hotkey(sub.ticket.miner_hotkey)
    other = CHARLIE if first is BOB else BOB
    h.fetch(first, sub.ticket.ticket_id)
    h.status(first, sub.job_id, sub.ticket, JobStatus.accepted)
    # a late report about a node the miner already replaced changes nothing
    h.core.admission.node_lost(h.seal(first, "node_lost", NodeLost(node_id="an-older-node")))
    assert h.incidents() == [] and h.core.organic.get(cap, sub.job_id).ticket == sub.ticket
    h.core.admission.node_lost(h.seal(first, "node_lost", NodeLost(node_id=node_of(first),
                                                         running_tickets=[sub.ticket.ticket_id])))

    assert h.incidents() == [(first.ss58, "fabric", "ray_node_lost", 1)]
    view = h.core.organic.get(cap, sub.job_id)
    assert view.status == JobStatus.received and view.attempt == 2
    assert view.ticket.miner_hotkey == other.ss58 and view.ticket.attempt == 2
    assert "lost: ray_node_lost (fabric incident, not charged); re-queued" in view.history[-2].detail
    refused(TicketRefused, "ticket_closed", h.fetch, first, sub.ticket.ticket_id)
    refused(TicketRefused, "ticket_closed", h.result, first, sub.job_id, sub.ticket)
    h.fetch(other, view.ticket.ticket_id)
    h.result(other, sub.job_id, view.ticket)
    assert h.core.organic.get(cap, sub.job_id).status == JobStatus.completed


def test_sweep_retires_a_miner_that_stopped_heartbeating(h):
    h.admit(BOB), h.admit(CHARLIE)
    cap = h.capability()
    sub = h.submit(cap)
    silent = by_hotkey(sub.ticket.miner_hotkey)
    alive = CHARLIE if silent is BOB else BOB
    h.core.sweep()
    assert h.incidents() == []  # everyone is within heartbeat_timeout_s
    h.clock.advance(h.settings.heartbeat_timeout_s + 1)
    h.core.admission.heartbeat(h.seal(alive, "heartbeat", Heartbeat()))
    h.core.sweep()
    # a cut link and a crash look alike: not charged (up to an allowance)
    assert h.incidents() == [(silent.ss58, "fabric", "miner_unreachable", 1)]
    view = h.core.organic.get(cap, sub.job_id)
    assert view.ticket.miner_hotkey == alive.ss58 and view.ticket.attempt == 2
    assert h.core.cluster_status()["incidents"][0]["reason"] == "miner_unreachable"
    assert "lost: miner_unreachable (fabric incident, not charged); re-queued" in view.history[-2].detail


def test_going_silent_is_charged_beyond_the_allowance(h):
    h.settings.unreachable_free = 1
    h.admit(BOB), h.admit(CHARLIE)
    cap = h.capability(max_jobs=4)
    kinds = []
    for _ in range(2):
        sub = h.submit(cap)
        silent = by_hotkey(sub.ticket.miner_hotkey)
        alive = CHARLIE if silent is BOB else BOB
        h.clock.advance(h.settings.heartbeat_timeout_s + 1)
        h.core.admission.heartbeat(h.seal(alive, "heartbeat", Heartbeat()))
        h.core.sweep()
        kinds += [k for hk, k, reason, _ in h.incidents() if hk == silent.ss58 and reason == "miner_unreachable"]
        h.admit(silent)  # it comes back (a fresh join) for the next round
        h.core.admission.heartbeat(h.seal(alive, "heartbeat", Heartbeat()))
    assert kinds[:1] == ["fabric"] and "miner" in kinds[1:], kinds


# ---------------------------------------------------------------------------- restart
def test_a_restarted_validator_core_reads_everything_back(h):
    h.admit(BOB)
    cap = h.capability(max_jobs=3)
    done = h.submit(cap)
    h.fetch(BOB, done.ticket.ticket_id)
    h.status(BOB, done.job_id, done.ticket, JobStatus.accepted)
    result_env = h.result(BOB, done.job_id, done.ticket)
    running = h.submit(cap)
    queued = h.submit(cap)
    before = {j: h.core.organic.get(cap, j) for j in (done.job_id, running.job_id, queued.job_id)}

    core = h.restart()
    for job_id, view in before.items():
        assert core.organic.get(cap, job_id) == view  # status, ticket, history, result, failure
    assert core.organic.get(cap, done.job_id).result == JobResult.model_validate(result_env.payload)  # the signed one
    refused(SignatureRejected, "replayed", core.organic.report_result, done.job_id, result_env)  # nonces persisted
    refused(CapabilityRefused, "over_budget", h.submit, cap)  # budget persisted
    h.fetch(BOB, running.ticket.ticket_id)  # the ticket issued before the restart is still current
    h.result(BOB, running.job_id, running.ticket)
    after = core.organic.get(cap, queued.job_id)
    assert after.ticket is not None and after.ticket.miner_hotkey == BOB.ss58
    assert core.cluster_status()["miners"][0]["jobs_done"] == 2


def test_charged_incidents_lower_a_miners_priority_for_a_while(h):
    h.admit(BOB, executors=2)
    h.admit(CHARLIE, executors=1)
    cap = h.capability()
    # Bob has the most free executors, so he gets work first ...
    first = h.submit(cap)
    assert first.ticket.miner_hotkey == BOB.ss58
    # ... until he restarts mid-job (a charged incident): Charlie is preferred though Bob is free again
    h.admit(BOB, executors=2)
    assert ("%s" % BOB.ss58, "miner", "agent_restarted", 1) in h.incidents()
    requeued = h.core.organic.get(cap, first.job_id)
    assert requeued.ticket.miner_hotkey == CHARLIE.ss58  # and not back to the miner that lost it
    h.result(CHARLIE, first.job_id, requeued.ticket)
    nxt = h.submit(cap)
    assert nxt.ticket.miner_hotkey == CHARLIE.ss58, "a miner with a recent charged incident should wait its turn"
    h.clock.advance(h.settings.incident_penalty_s + 1)
    for m in (BOB, CHARLIE):  # stay live through the jump
        h.core.admission.heartbeat(h.seal(m, "heartbeat", Heartbeat()))
    h.result(CHARLIE, nxt.job_id, h.core.organic.get(cap, nxt.job_id).ticket)
    assert h.submit(cap).ticket.miner_hotkey == BOB.ss58  # the penalty has expired
