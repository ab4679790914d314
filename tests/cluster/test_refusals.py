"""Refusals with clear reasons, against the running validator-core and real agents: admission,
tickets (the engine's event stream shows no container created), spec requests for another
miner's ticket, capabilities."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from cluster.protocol.envelope import seal
from cluster.protocol.http import ServiceClient
from cluster.protocol.identity import Hotkey, offset_clock
from cluster.miner.agent import AgentCore
from cluster.miner.docker_runtime import DockerRuntime
from cluster.protocol.messages import Challenge, ChallengeRequest, JoinRequest, SpecGrant, Ticket, TicketFetch
from cluster.resources import config_path
from cluster.settings import load_executor_classes
from cluster.protocol.user import request_capability
from cluster.protocol.version import local_versions
from cluster.errors import AdmissionRefused, CapabilityRefused, SignatureRejected, TicketRefused
from cluster.protocol.jobs import JobSpec
from tests.conftest import DOCKER_HOST, HELLO, IMAGE, USER_URI, container_events

pytestmark = pytest.mark.integration

VALIDATOR = Hotkey.from_uri("//Alice")
URIS = {"miner1": "//Bob", "miner2": "//Charlie"}


def join(stack, hotkey: Hotkey, *, versions: dict | None = None, clock=None) -> dict:
    client = ServiceClient(stack.validator_url)
    ch = Challenge.model_validate(client.post("/v1/admission/challenge",
                                              ChallengeRequest(miner_hotkey=hotkey.ss58).model_dump()))
    req = JoinRequest(validator=VALIDATOR.ss58, challenge=ch.nonce, executor_classes={"always_on.test": 1},
                      versions=versions or local_versions())
    env = seal(hotkey, "admission_join", req, **({"clock": clock} if clock else {}))
    return client.post_signed("/v1/admission/join", env)


# ---------------------------------------------------------------------------------- admission
def test_admission_refuses_a_hotkey_not_in_the_metagraph(stack):
    stranger = Hotkey.generate()
    with pytest.raises(AdmissionRefused) as err:
        join(stack, stranger)
    assert err.value.reason == "not_registered"
    assert f"hotkey {stranger.ss58} is not registered on subnet 12" in err.value.message


@pytest.mark.parametrize("name, value", [("ray", "2.59.0"), ("python", "3.12"), ("rayhorde", "0.0.1")])
def test_admission_refuses_mismatched_versions(stack, name, value):
    versions = {**local_versions(), name: value}
    with pytest.raises(AdmissionRefused) as err:
        join(stack, Hotkey.from_uri("//Bob"), versions=versions)
    assert err.value.reason == "version_mismatch"
    assert f"miner runs {name} {value}; this validator requires {name} {local_versions()[name]}" in err.value.message


def test_admission_refuses_a_skewed_clock_and_a_replayed_join(stack):
    with pytest.raises(SignatureRejected) as err:
        join(stack, Hotkey.generate(), clock=offset_clock(-120))
    assert err.value.reason == "clock_skew" and "max skew 5 s" in err.value.message
    client = ServiceClient(stack.validator_url)
    hk = Hotkey.generate()
    ch = client.post("/v1/admission/challenge", {"miner_hotkey": hk.ss58})
    env = seal(hk, "admission_join", JoinRequest(validator=VALIDATOR.ss58, challenge=ch["nonce"],
                                                 executor_classes={"always_on.test": 1}, versions=local_versions()))
    with pytest.raises(AdmissionRefused):
        client.post_signed("/v1/admission/join", env)  # not registered
    with pytest.raises(SignatureRejected) as err:
        client.post_signed("/v1/admission/join", env)
    assert err.value.reason == "replayed"


# ---------------------------------------------------------------------------------- tickets
@pytest.fixture(scope="module")
def test_agent(stack, tmp_path_factory):
    """A second agent process-equivalent for miner1's hotkey, in this process, on the real engine."""
    def make(uri: str, clock=None) -> AgentCore:
        return AgentCore(hotkey=Hotkey.from_uri(uri), validator_hotkey=VALIDATOR.ss58,
                         validator=ServiceClient(stack.validator_url), runtime=DockerRuntime(DOCKER_HOST),
                         classes=load_executor_classes(config_path("executor_classes.toml")),
                         home=tmp_path_factory.mktemp("agent"), max_skew_s=5,
                         **({"clock": clock} if clock else {}))
    return make


def crafted_bundle(miner: str, *, signer: Hotkey = VALIDATOR, expires_in_s: float = 60) -> dict:
    ticket = Ticket(ticket_id=uuid.uuid4().hex, job_id=uuid.uuid4().hex, attempt=1, miner=miner,
                    executor_class="always_on.test", expires_ns=time.time_ns() + int(expires_in_s * 1e9))
    grant = SpecGrant(ticket_id=ticket.ticket_id, job_id=ticket.job_id,
                      spec=JobSpec(image=IMAGE, command=["sh", "-c", "echo ran"]))
    return {"ticket": seal(signer, "ticket", ticket).model_dump(), "spec": seal(signer, "job_spec", grant).model_dump(),
            "_ticket": ticket}


def refused(agent: AgentCore, bundle: dict) -> TicketRefused:
    ticket = bundle["_ticket"]
    with pytest.raises(TicketRefused) as err:
        agent.execute_bundle(bundle, ticket_id=ticket.ticket_id, attempt=1)
    return err.value


def test_ticket_signed_by_another_key_is_refused_and_nothing_runs(stack, engine, test_agent):
    agent = test_agent("//Bob")
    since = time.time()
    bundle = crafted_bundle(agent.hotkey.ss58, signer=Hotkey.generate())
    err = refused(agent, bundle)
    assert err.reason == "invalid_signature" and "wrong_signer" not in err.message
    assert f"expected one of ['{VALIDATOR.ss58}']" in err.message
    tampered = crafted_bundle(agent.hotkey.ss58)
    tampered["ticket"]["payload"]["executor_class"] = "always_on.gpu-24gb"
    err = refused(agent, tampered)
    assert err.reason == "invalid_signature" and "does not verify" in err.message
    assert container_events(engine, since, **{"rayhorde.agent": agent.hotkey.ss58}) == []


def test_ticket_for_another_miner_is_refused(stack, engine, test_agent):
    agent = test_agent("//Bob")
    since = time.time()
    charlie = Hotkey.from_uri("//Charlie").ss58
    err = refused(agent, crafted_bundle(charlie))
    assert err.reason == "wrong_miner"
    assert f"addressed to {charlie}; this miner is {agent.hotkey.ss58}" in err.message
    assert container_events(engine, since, **{"rayhorde.agent": agent.hotkey.ss58}) == []


def test_expired_ticket_is_refused(stack, engine, test_agent):
    agent = test_agent("//Bob")
    since = time.time()
    err = refused(agent, crafted_bundle(agent.hotkey.ss58, expires_in_s=-60))
    assert err.reason == "ticket_expired"
    assert "expired 60." in err.message and "max skew 5 s" in err.message
    assert container_events(engine, since, **{"rayhorde.agent": agent.hotkey.ss58}) == []


def _register(stack) -> dict:
    """Register a job over HTTP (no Ray task): returns validator-core's answer with its ticket."""
    sub = ServiceClient(stack.validator_url, headers={"Authorization": f"Bearer {stack.capability}"}).post(
        "/v1/jobs", {"image": IMAGE, "command": ["sh", "-c", HELLO], "env": {"NAME": "replay"}})
    return {"job_id": sub["job_id"], **sub["ticket"]}


def test_replayed_ticket_runs_once(stack, engine, test_agent):
    sub = _register(stack)
    miner_name = next(n for n, hk in stack.miners.items() if hk == sub["miner_hotkey"])
    agent = test_agent(URIS[miner_name])
    since = time.time()
    bundle = agent.validator.post_signed("/v1/tickets/fetch", seal(agent.hotkey, "ticket_fetch",
                                                                   TicketFetch(ticket_id=sub["ticket_id"])))
    assert agent.execute_bundle(bundle, ticket_id=sub["ticket_id"], attempt=1).value == "completed"
    with pytest.raises(TicketRefused) as err:
        agent.execute_bundle(bundle, ticket_id=sub["ticket_id"], attempt=1)
    assert err.value.reason == "ticket_replayed" and "single use" in err.value.message
    created = container_events(engine, since, **{"rayhorde.ticket": sub["ticket_id"]})
    assert len(created) == 1
    # and validator-core no longer hands the finished ticket out at all
    with pytest.raises(TicketRefused) as err:
        agent.run_ticket(sub["ticket_id"], 1)
    assert err.value.reason == "ticket_closed"


def test_spec_request_for_another_miners_ticket_is_refused(stack, engine, test_agent):
    sub = _register(stack)
    owner = next(n for n, hk in stack.miners.items() if hk == sub["miner_hotkey"])
    other = "miner2" if owner == "miner1" else "miner1"
    since = time.time()
    with pytest.raises(TicketRefused) as err:
        test_agent(URIS[other]).run_ticket(sub["ticket_id"], 1)
    assert err.value.reason == "wrong_miner"
    assert f"ticket {sub['ticket_id']} is addressed to another miner" in err.value.message
    assert container_events(engine, since, **{"rayhorde.ticket": sub["ticket_id"]}) == []
    assert test_agent(URIS[owner]).run_ticket(sub["ticket_id"], 1).value == "completed"  # frees the executor


def test_ticket_id_alone_fetches_nothing(stack, test_agent):
    sub = _register(stack)
    raw = httpx.post(f"{stack.validator_url}/v1/tickets/fetch", json={"ticket_id": sub["ticket_id"]})
    assert raw.status_code == 401 and raw.json()["error"]["reason"] == "unsigned"
    outsider = Hotkey.generate()
    with pytest.raises(AdmissionRefused) as err:
        ServiceClient(stack.validator_url).post_signed(
            "/v1/tickets/fetch", seal(outsider, "ticket_fetch", TicketFetch(ticket_id=sub["ticket_id"])))
    assert err.value.reason == "not_admitted"
    forged = seal(outsider, "ticket_fetch", TicketFetch(ticket_id=sub["ticket_id"]))
    forged = forged.model_copy(update={"signer": sub["miner_hotkey"]})  # claims the owner, signed by someone else
    with pytest.raises(SignatureRejected) as err:
        ServiceClient(stack.validator_url).post_signed("/v1/tickets/fetch", forged)
    assert err.value.reason == "invalid_signature"
    assert httpx.get(f"{stack.validator_url}/v1/jobs/{sub['job_id']}").status_code == 401
    owner = next(n for n, hk in stack.miners.items() if hk == sub["miner_hotkey"])
    assert test_agent(URIS[owner]).run_ticket(sub["ticket_id"], 1).value == "completed"  # the owner still can


# ---------------------------------------------------------------------------------- capabilities
def test_capability_refused_for_a_user_off_the_whitelist(stack):
    stranger = Hotkey.generate()
    with pytest.raises(CapabilityRefused) as err:
        request_capability(stack.validator_url, stranger)
    assert err.value.reason == "not_whitelisted"
    assert f"user {stranger.ss58} is not on this validator's user whitelist" in err.value.message


def test_expired_capability_is_refused(stack, engine):
    cap = request_capability(stack.validator_url, Hotkey.from_uri(USER_URI), max_jobs=5, ttl_s=1)
    time.sleep(1.5)
    since = time.time()
    import jobs
    with pytest.raises(CapabilityRefused) as err:
        jobs.submit({"image": IMAGE, "command": ["true"]}, validator_url=stack.validator_url, capability=cap)
    assert err.value.reason == "capability_expired" and "request a new one" in err.value.message
    assert container_events(engine, since) == []


def test_over_budget_capability_is_refused(stack):
    import jobs
    cap = request_capability(stack.validator_url, Hotkey.from_uri(USER_URI), max_jobs=1, ttl_s=60)
    first = jobs.submit({"image": IMAGE, "command": ["true"]}, validator_url=stack.validator_url, capability=cap)
    assert first.result(timeout_s=60).status.value == "completed"
    with pytest.raises(CapabilityRefused) as err:
        jobs.submit({"image": IMAGE, "command": ["true"]}, validator_url=stack.validator_url, capability=cap)
    assert err.value.reason == "over_budget" and "allows 1 jobs and all are used" in err.value.message


def test_forged_capability_is_refused(stack):
    import jobs
    from cluster.protocol.messages import Capability
    fake = seal(Hotkey.generate(), "capability", Capability(capability_id="x", user=Hotkey.from_uri(USER_URI).ss58,
                                                            max_jobs=99, expires_ns=time.time_ns() + 10**12))
    with pytest.raises(CapabilityRefused) as err:
        jobs.submit({"image": IMAGE, "command": ["true"]}, validator_url=stack.validator_url,
                    capability=fake.to_token())
    assert err.value.reason == "invalid_capability"


def test_a_ticket_the_miner_refuses_ends_the_job_rejected_with_its_reason(stack, engine, test_agent):
    """The driver no longer reads refusals from the task's return value: the agent reports them."""
    sub = _register(stack)
    owner = next(n for n, hk in stack.miners.items() if hk == sub["miner_hotkey"])
    agent = test_agent(URIS[owner])
    since = time.time()
    bundle = agent.validator.post_signed("/v1/tickets/fetch", seal(agent.hotkey, "ticket_fetch",
                                                                   TicketFetch(ticket_id=sub["ticket_id"])))
    bundle["ticket"]["payload"]["executor_class"] = "always_on.gpu-24gb"  # no longer the validator's ticket
    with pytest.raises(TicketRefused) as err:
        agent.execute_bundle(bundle, ticket_id=sub["ticket_id"], attempt=1)
    assert err.value.reason == "invalid_signature"
    view = ServiceClient(stack.validator_url, headers={"Authorization": f"Bearer {stack.capability}"}).get(
        f"/v1/jobs/{sub['job_id']}")
    assert view["status"] == "rejected"
    assert (view["failure"]["kind"], view["failure"]["reason"], view["failure"]["stage"]) == (
        "rejection", "invalid_signature", "ticket")
    assert view["failure"]["reporter"] == agent.hotkey.ss58
    assert container_events(engine, since, **{"rayhorde.ticket": sub["ticket_id"]}) == []
