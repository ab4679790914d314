"""Fuzzing validator-core's doors (issue 13): whatever a client sends, the answer is a 2xx, or a
4xx in the one error shape ``{"error": {"reason": str, "message": str}}``; never a 5xx, never a
hang (every request has a timeout).

The real app over uvicorn on 127.0.0.1, on a real ValidatorCore (SQLite and PostgreSQL, real
sr25519 keys: the harness of test_validator_service), fuzzed three ways, each with a bounded
number of cases per door and derandomized, so CI sends the same cases on every run:

* schemathesis over the app's OpenAPI schema, with the bodies the endpoints read by hand described
  (a signed envelope, a job spec, a stream spec): positive and negative cases, the coverage
  phase's boundaries and unexpected methods. Each case goes unauthenticated (the generated
  header), with a real capability, a real job scope, or another user's capability, naming the
  generated job id, the user's real job or another user's;
* hypothesis over the signed doors: payloads of each door's envelope kind, a valid one mutated
  field by field or one made of its field names, sealed with real keys (an admitted miner, a
  registered miner not admitted, the user, a stranger), fresh, skewed or replayed, so that cases
  get past the signature to the desks behind it; or tampered with after signing (floats too);
* hypothesis over paths and methods off the schema (no route, a method a route does not take, a
  slash too many): the framework's own answers are in the error shape too, and none redirects.
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from types import SimpleNamespace
from typing import Any, Iterator
from urllib.parse import quote

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig

from cluster.errors import AdmissionRefused
from cluster.miner.serving import BackgroundServer
from cluster.protocol.envelope import SignedEnvelope, seal
from cluster.protocol.jobs import JobSpec, JobStatus
from cluster.protocol.messages import KINDS, CapabilityRequest, ChallengeRequest
from cluster.protocol.streams import StreamSpec
from cluster.protocol.version import local_versions
from cluster.settings import ValidatorSettings
from cluster.validator.app import build_app
from tests.cluster.validator.test_validator_service import ALICE, BOB, CHARLIE, CLASS, DAVE, EVE, Harness, node_of
from tests.support.fuzz import JSON_VALUES, assert_protocol_answer
from tests.support.net import free_port
from tests.support.pg import fresh_database

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 10  # an answer slower than this is a hang (long-polls are cut to 1 s below)
SCHEMA_EXAMPLES = 20  # fuzzing-phase cases per operation (the coverage phase adds its own, bounded)
SIGNED_EXAMPLES = 40  # cases per signed door

# The doors that take a signed envelope, and the kind each one's desk opens.
SIGNED_DOORS = {
    "/v1/admission/join": "admission_join",
    "/v1/admission/preflight": "admission_preflight",
    "/v1/admission/node": "node_started",
    "/v1/admission/node_lost": "node_lost",
    "/v1/heartbeat": "heartbeat",
    "/v1/capabilities": "capability_request",
    "/v1/tickets/fetch": "ticket_fetch",
    "/v1/tickets/current": "ticket_current",
    "/v1/jobs/{job_id}/status": "job_status",
    "/v1/jobs/{job_id}/result": "job_result",
    "/v1/streams/{job_id}/ready": "stream_ready",
}


# ---------------------------------------------------------------------------- the check
def not_a_server_error_and_the_error_shape(ctx, response, case) -> None:
    """schemathesis check: see :func:`assert_protocol_answer`."""
    assert_protocol_answer(response.status_code, response.content, f"{case.method} {case.formatted_path}")


# ---------------------------------------------------------------------------- the world
def fuzz_schema() -> dict[str, Any]:
    """validator-core's OpenAPI schema (the app serves none: ``openapi_url=None``), with the bodies
    its endpoints read by hand described, so the fuzzer builds envelopes and specs, not only
    arbitrary objects. The routes need no core to be described."""
    schema = build_app(SimpleNamespace(settings=ValidatorSettings())).openapi()
    components = schema.setdefault("components", {}).setdefault("schemas", {})

    def body_of(model) -> dict[str, Any]:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(js.pop("$defs", {}))
        components[model.__name__] = js
        return {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}

    for path in SIGNED_DOORS:
        schema["paths"][path]["post"]["requestBody"] = body_of(SignedEnvelope)
    schema["paths"]["/v1/jobs"]["post"]["requestBody"] = body_of(JobSpec)
    schema["paths"]["/v1/streams"]["post"]["requestBody"] = body_of(StreamSpec)
    return schema


CONFIG = SchemathesisConfig.from_dict({
    "generation": {"max-examples": SCHEMA_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"coverage": {"enabled": True}, "stateful": {"enabled": False}},
    "request-timeout": REQUEST_TIMEOUT_S,
})
schema = schemathesis.openapi.from_dict(fuzz_schema(), config=CONFIG)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def door(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """validator-core served on 127.0.0.1 with what a client can name: Bob admitted with a node and
    a ticket, Charlie registered but not admitted, Dave's and Eve's capabilities and jobs, a job
    scope. The unsigned doors' rate limit is raised so the fuzzer reaches the desks behind it."""
    tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            db_url = stack.enter_context(fresh_database(request.getfixturevalue("postgres_server")))
        else:
            db_url = f"sqlite:///{tmp / 'v.db'}"
        yield from _served(Harness(tmp, db_url))


def _served(h: Harness) -> Iterator[SimpleNamespace]:
    h.settings = h.settings.model_copy(update={"users": [DAVE.ss58, EVE.ss58], "public_rate_per_s": 10_000.0,
                                               "public_burst": 10_000})
    h.restart()
    h.admit(BOB)
    dave, eve = _token(h, DAVE), _token(h, EVE)
    submitted = h.submit(h.core.capabilities.check(dave))
    assert submitted.ticket is not None, submitted  # Bob's one executor took it
    eves_job = h.submit(h.core.capabilities.check(eve)).job_id
    scope = h.core.capabilities.scope(h.core.capabilities.check(dave), job_id=submitted.job_id)
    world = SimpleNamespace(h=h, job_id=submitted.job_id, ticket_id=submitted.ticket.ticket_id, eves_job=eves_job,
                            tokens={"user": dave, "scope": scope, "other_user": eve})
    challenges: list[str] = []

    def challenge() -> str:
        """A challenge for Charlie: a new one, or the last one while too many are open."""
        try:
            challenges.append(h.core.admission.challenge(ChallengeRequest(miner_hotkey=CHARLIE.ss58)).nonce)
        except AdmissionRefused as exc:
            assert exc.reason == "too_many_challenges", exc
        return challenges[-1]

    world.challenge = challenge
    port = free_port()
    server = BackgroundServer(build_app(h.core), name="validator-core", host="127.0.0.1", port=port)
    server.start()
    world.url = f"http://127.0.0.1:{port}"
    try:
        yield world
    finally:
        server.stop()
        for core in h.cores:
            core.engine.dispose()


def _token(h: Harness, user) -> str:
    req = CapabilityRequest(validator=ALICE.ss58, max_jobs=1000, ttl_s=3600)
    return h.core.capabilities.issue(h.seal(user, "capability_request", req))


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as c:
        yield c


# ---------------------------------------------------------------------------- schemathesis
AUTH = ("generated", "user", "scope", "other_user")  # the generated header, or a real token of that kind
JOBS = ("generated", "own", "others")  # the generated job id, the user's real job, another user's


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_any_request_is_answered_2xx_or_4xx_in_the_error_shape(case, door, session):
    # The variant follows from the case itself (not @schema.given, which would turn the coverage
    # phase off), so a case and its shrunk forms are sent the same way on every run.
    body = case.body if isinstance(case.body, (dict, list, str, bytes, int, float, bool)) else None  # not NotSet
    variant = zlib.crc32(repr((case.method, case.path_parameters, case.query, case.headers, body)).encode())
    who, job = AUTH[variant % len(AUTH)], JOBS[variant // len(AUTH) % len(JOBS)]
    headers = dict(case.headers or {})
    if who != "generated":
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        headers["Authorization"] = f"Bearer {door.tokens[who]}"
    case.headers = headers
    if case.path_parameters and "job_id" in case.path_parameters and job != "generated":
        case.path_parameters["job_id"] = door.job_id if job == "own" else door.eves_job
    _cut_long_polls(case)
    try:
        response = case.call(base_url=door.url, session=session, timeout=REQUEST_TIMEOUT_S)
    except requests.Timeout as exc:
        pytest.fail(f"{case.method} {case.formatted_path}: no answer within {REQUEST_TIMEOUT_S} s (a hang): {exc}")
    case.validate_response(response, checks=[not_a_server_error_and_the_error_shape])


def _cut_long_polls(case) -> None:
    """A long-poll waits as long as it is asked (at most 30 s: no hang); the fuzzer's asks are cut
    to 1 s so the run stays short. Values that are no number are sent as generated."""
    def cut(value):
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            return value
        return 1 if isinstance(value, (int, float, str)) and not isinstance(value, bool) and math.isfinite(number) \
            and 1 < number <= 30 else value
    if case.query and "wait_s" in case.query:
        case.query["wait_s"] = cut(case.query["wait_s"])
    if isinstance(case.body, dict) and "wait_s" in case.body:
        case.body["wait_s"] = cut(case.body["wait_s"])


# ---------------------------------------------------------------------------- signed doors
SIGNERS = {"admitted miner": BOB, "registered miner": CHARLIE, "user": DAVE, "stranger": EVE}


def valid_payload(door: SimpleNamespace, kind: str, job_id: str) -> dict[str, Any]:
    """A payload of ``kind`` that its desk would take from the right signer."""
    if kind == "admission_join":
        return {"validator": ALICE.ss58, "challenge": door.challenge(), "executor_classes": {CLASS: 1},
                "proxy_url": "", "versions": local_versions()}
    return {
        "admission_preflight": {"validator": ALICE.ss58, "address": "127.0.0.1", "ports": [free_port()]},
        "node_started": {"node_id": node_of(BOB)},
        "node_lost": {"node_id": node_of(BOB), "running_tickets": [door.ticket_id]},
        "heartbeat": {"running_tickets": [door.ticket_id]},
        "capability_request": {"validator": ALICE.ss58, "max_jobs": 5, "ttl_s": 60},
        "ticket_fetch": {"ticket_id": door.ticket_id},
        "ticket_current": {"ticket_id": door.ticket_id},
        "job_status": {"ticket_id": door.ticket_id, "attempt": 1, "status": JobStatus.executor_ready.value,
                       "detail": "x"},
        "job_result": {"job_id": job_id, "ticket_id": door.ticket_id, "attempt": 1, "miner_hotkey": BOB.ss58,
                       "status": "completed", "exit_code": 0, "stdout": "hi\n", "artifacts": {}},
        "stream_ready": {"job_id": job_id, "job_key": {"scheme": "ed25519", "public": "ab" * 32},
                         "proxy_url": "http://127.0.0.1:1"},
    }[kind]


@st.composite
def payloads(draw, fields: list[str], valid: dict[str, Any]) -> dict[str, Any]:
    """The valid payload with some fields replaced, dropped or added, or one made of field names."""
    if draw(st.booleans()):
        out = dict(valid)
        for name in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
            if draw(st.booleans()):
                out[name] = draw(JSON_VALUES)
            else:
                out.pop(name, None)
        out.update(draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=2)))
        return out
    return draw(st.dictionaries(st.sampled_from(fields) | st.text(max_size=8), JSON_VALUES, max_size=len(fields) + 1))


@pytest.mark.parametrize("path", list(SIGNED_DOORS))
@settings(max_examples=SIGNED_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_signed_doors_answer_any_payload_2xx_or_4xx_in_the_error_shape(door, client, path, data):
    kind = SIGNED_DOORS[path]
    job_id = data.draw(st.sampled_from([door.job_id, door.eves_job]) | st.text(min_size=1, max_size=40), "job_id")
    fields = list(KINDS[kind].model_fields)
    payload = data.draw(payloads(fields, valid_payload(door, kind, job_id)), "payload")
    signer = SIGNERS[data.draw(st.sampled_from(sorted(SIGNERS)), "signer")]
    sealed_kind = data.draw(st.sampled_from([kind, kind, kind, *sorted(KINDS)]), "kind")
    skew_s = data.draw(st.sampled_from([0, 0, 0, -600, 600]), "skew_s")
    env = seal(signer, sealed_kind, payload, clock=lambda: door.h.clock() + int(skew_s * 1e9))
    sent = env.model_dump(mode="json")
    if data.draw(st.booleans(), "tampered"):  # changed after signing, with any JSON (floats too: none can be signed)
        where = data.draw(st.sampled_from(["payload", "v", "t", "nonce", "signer", "sig"]), "where")
        value = data.draw(JSON_VALUES | st.floats(), "value")
        if where == "payload":
            sent["payload"] = {**sent["payload"], data.draw(st.sampled_from(fields) | st.text(max_size=8)): value}
        else:
            sent[where] = value
    url = door.url + path.replace("{job_id}", quote(job_id, safe=""))
    raw = json.dumps(sent)  # Python's json writes NaN and Infinity, as a hostile client may
    for attempt in range(2 if data.draw(st.booleans(), "replayed") else 1):
        try:
            resp = client.post(url, content=raw, headers={"content-type": "application/json"})
        except httpx.TimeoutException as exc:
            pytest.fail(f"POST {path}: no answer within {REQUEST_TIMEOUT_S} s (a hang): {exc!r}")
        assert_protocol_answer(resp.status_code, resp.content, f"POST {url} ({sealed_kind} by {signer.ss58[:8]}, "
                                                               f"try {attempt + 1}) {raw[:300]}")


# ---------------------------------------------------------------------------- off the schema
SCHEMA_PATHS = sorted(fuzz_schema()["paths"])


@settings(max_examples=SIGNED_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.sampled_from(SCHEMA_PATHS).map(lambda p: p.replace("{job_id}", "j").replace("{request_id}", "r"))
       | st.lists(st.text(min_size=1, max_size=12).map(lambda t: quote(t, safe="")), min_size=1, max_size=4)
       .map(lambda parts: "/" + "/".join(parts)),
       suffix=st.sampled_from(["", "/", "//", "/x", "?a=1"]))
def test_paths_and_methods_off_the_schema_get_a_4xx_in_the_error_shape(door, client, method, path, suffix):
    """No route, a method the route does not take, a slash too many: a 4xx in the error shape (not
    the framework's ``{"detail"}``, not a redirect)."""
    try:
        resp = client.request(method, door.url + path + suffix, content=b"{}")
    except httpx.TimeoutException as exc:
        pytest.fail(f"{method} {path}{suffix}: no answer within {REQUEST_TIMEOUT_S} s (a hang): {exc!r}")
    if method == "HEAD":
        assert resp.status_code < 500 and not 300 <= resp.status_code < 400, (method, path, suffix, resp.status_code)
    else:
        assert_protocol_answer(resp.status_code, resp.content, f"{method} {path}{suffix}")
