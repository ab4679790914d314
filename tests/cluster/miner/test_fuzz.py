"""Fuzzing a miner's doors (issue 13): whatever a client sends, the miner proxy and the agent's
executor API answer a 2xx, or a 4xx in the one error shape ``{"error": {"reason": str,
"message": str}}``; never a 5xx, never a hang (every request has a timeout).

Neither door has an OpenAPI schema, so hypothesis draws the requests: method, path (the doors'
routes with real, ended and made-up job ids and names), headers and body, unsigned, signed with
the job's registered client key, signed and then tampered with (body, path, method, job, clock),
replayed, or carrying garbage where the signature goes. A bounded number of cases per door,
derandomized, so CI sends the same cases on every run.

The miner's real wiring: the StreamKeeper's proxy (receipts on disk) in front of the echo app
(uvicorn on 127.0.0.1), and the executor API on a unix socket over a real AgentCore, whose ticket
fetches go to a real validator-core (the harness of test_validator_service, served), and a real
StreamKeeper for the job volume reads. The echo app reads volumes through that socket, so a
signed ``/volume`` call crosses all three doors.
"""

from __future__ import annotations

import base64
import json
import time
from types import SimpleNamespace
from typing import Any, Iterator
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Route

from cluster.miner.agent import AgentCore
from cluster.miner.executor_api import build_executor_app
from cluster.miner.proxy import JobRoute
from cluster.miner.runtime import REQUIRED
from cluster.miner.serving import BackgroundServer
from cluster.miner.streams import StreamKeeper
from cluster.protocol.client_envelope import REQUEST_HEADER, SIGNATURE_HEADER, sign_request
from cluster.protocol.envelope import seal
from cluster.protocol.http import ServiceClient
from cluster.protocol.jobs import AGENT_SOCKET_ENV
from cluster.protocol.keys import SigningKey
from cluster.protocol.streams import VOLUME_READ_PATH, VolumeRead
from cluster.settings import load_executor_classes
from cluster.validator.app import build_app
from serve_apps.echo import EchoApp
from tests.cluster.validator.test_validator_service import ALICE, BOB, EVE, REPO, Harness
from tests.support.fuzz import JSON_VALUES, assert_protocol_answer
from tests.support.net import free_port

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 10  # an answer slower than this is a hang
EXAMPLES = 150  # cases per door
MINER = BOB
JOB, ENDED = "s" + "a" * 32, "s" + "e" * 32
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------- the world
@pytest.fixture(scope="module")
def miner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("miner-fuzz")
    h = Harness(tmp, f"sqlite:///{tmp / 'validator.db'}")
    h.clock = time.time_ns  # the agent signs with the real clock: validator-core keeps the same time
    h.restart()
    validator = BackgroundServer(build_app(h.core), name="validator-core", host="127.0.0.1", port=free_port())
    validator.start()
    validator_url = f"http://127.0.0.1:{validator.server.config.port}"
    mp = pytest.MonkeyPatch()
    proxy_port = free_port()
    keeper = StreamKeeper(MINER, ServiceClient(validator_url), validator_hotkey=ALICE.ss58, proxy_port=proxy_port,
                          proxy_url="http://127.0.0.1:1", serve_url="http://127.0.0.1:1",
                          volumes_dir=tmp / "volumes", idle_timeout_s=2, max_skew_s=5, volume_max_bytes=4096,
                          request_max_bytes=4096, receipts_path=tmp / "receipts.db")
    # No ticket the fuzzer can name is this miner's (Bob is not even admitted), so no poke reaches
    # the container runtime: a stub with the features an agent demands. Were one to get there,
    # its missing methods would make a 500, which the test reports.
    agent = AgentCore(hotkey=MINER, validator_hotkey=ALICE.ss58, validator=ServiceClient(validator_url, timeout_s=5),
                      runtime=SimpleNamespace(features=REQUIRED), home=tmp / "agent", max_skew_s=5,
                      classes=load_executor_classes(REPO / "configs" / "executor_classes.toml"))
    sock = str(tmp / "agent.sock")
    executor = BackgroundServer(build_executor_app(agent, keeper.read_volume), name="executor API", uds=sock)
    executor.start()
    mp.setenv(AGENT_SOCKET_ENV, sock)  # the echo app reads its volume through the executor socket

    client = SigningKey()
    echo = EchoApp(JOB, MINER.ss58, [client.public.model_dump()], route_prefix=f"/jobs/{JOB}")

    async def endpoint(request):
        return await echo(request)
    job = BackgroundServer(Starlette(routes=[Route(f"/jobs/{JOB}/{{rest:path}}", endpoint, methods=["GET", "POST"])]),
                           name="echo job", host="127.0.0.1", port=free_port())
    job.start()
    upstream = f"http://127.0.0.1:{job.server.config.port}"
    keeper.start()
    keeper.proxy.add_job(JobRoute(job_id=JOB, upstream=upstream, client_keys=[client.public],
                                  job_key=echo.side.key.public))
    keeper.proxy.add_job(JobRoute(job_id=ENDED, upstream=upstream, client_keys=[client.public],
                                  job_key=echo.side.key.public))
    keeper.proxy.end_job(ENDED, "terminated")
    (tmp / "volumes" / JOB).mkdir(parents=True)
    (tmp / "volumes" / JOB / "notes.txt").write_text("notes")
    world = SimpleNamespace(h=h, keeper=keeper, client=client, echo=echo, sock=sock,
                            proxy_url=f"http://127.0.0.1:{proxy_port}")
    with httpx.Client(base_url=world.proxy_url, timeout=REQUEST_TIMEOUT_S) as c:  # a few answers to page through
        for i in range(3):
            body = json.dumps({"i": i}).encode()
            path = f"/jobs/{JOB}/echo"
            assert c.post(path, content=body, headers=sign_request(client, job_id=JOB, method="POST", path=path,
                                                                   body=body)).status_code == 200
    try:
        yield world
    finally:
        keeper.stop()
        job.stop()
        executor.stop()
        validator.stop()
        mp.undo()
        for core in h.cores:
            core.engine.dispose()


@pytest.fixture(scope="module")
def proxy(miner) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=miner.proxy_url, timeout=REQUEST_TIMEOUT_S) as c:
        yield c


@pytest.fixture(scope="module")
def executor(miner) -> Iterator[httpx.Client]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=miner.sock), base_url="http://agent",
                      timeout=REQUEST_TIMEOUT_S) as c:
        yield c


def send(client: httpx.Client, method: str, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    try:
        return client.request(method, path, content=body, headers=headers)
    except httpx.TimeoutException as exc:
        pytest.fail(f"{method} {path}: no answer within {REQUEST_TIMEOUT_S} s (a hang): {exc!r}")


def check(resp: httpx.Response, what: str) -> None:
    if resp.request.method == "HEAD":  # no body to look at
        assert resp.status_code < 500, f"{what}: server error {resp.status_code}"
        return
    assert_protocol_answer(resp.status_code, resp.content, what)


# ---------------------------------------------------------------------------- strategies
# a header value (printable ASCII, no blank at either end: HTTP allows no other)
PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
# any text as one path segment, percent-encoded; none that the routing or the client would split,
# fold or not match ("/" and a newline, decoded before routing; "." and ".."): those paths are
# unrouted, the other test's
SEGMENT = st.text(min_size=1, max_size=24).filter(lambda t: not {"/", "\n"} & set(t) and t not in (".", "..")) \
    .map(lambda t: quote(t, safe=""))


def mostly(known: list | st.SearchStrategy, other: st.SearchStrategy, *, one_in: int = 5) -> st.SearchStrategy:
    """One of ``known`` (a list: repeat one to weigh it; or a strategy), or one time in ``one_in`` a
    value of ``other``: cases that get past the checks to the job and the desks behind them, with
    enough of the rest."""
    usual = st.sampled_from(known) if isinstance(known, list) else known
    # hypothesis starts from (and shrinks towards) the least choice: there, the usual value
    return st.integers(0, one_in - 1).flatmap(lambda i: other if i == one_in - 1 else usual)


JOB_IDS = mostly([JOB, JOB, JOB, ENDED, "s" + "b" * 32], SEGMENT)
JSON_BODIES = JSON_VALUES.map(lambda v: json.dumps(v).encode())
BODIES = mostly([b"{}", b'{"name": "notes.txt"}', b'{"name": "absent.txt"}', b'{"name": "../etc/passwd"}',
                 b'{"name": 1.5}', b"not json", b""], st.binary(max_size=300) | JSON_BODIES, one_in=2)


@st.composite
def routed(draw) -> tuple[str, str]:
    """A method and path the proxy routes (the forward, volume and receipt doors)."""
    job = draw(JOB_IDS)
    door = draw(st.sampled_from(["forward", "forward", "forward", "volume", "receipts", "receipt"]))
    if door == "forward":
        rest = draw(mostly(["echo", "echo", "echo?stream=1", "volume", "nowhere"], SEGMENT))
        if draw(st.integers(0, 3)) == 3:
            rest += "?" + quote(draw(st.text(max_size=16)), safe="=&")
        return draw(st.sampled_from(["POST", "POST", "POST", "GET", "HEAD"])), f"/jobs/{job}/{rest}"
    if door == "volume":
        return "PUT", f"/jobs/{job}/volume/{draw(mostly(['notes.txt', 'new.bin', '.x', '-x'], SEGMENT))}"
    if door == "receipts":
        query = draw(st.sampled_from(["", "?after_seq=0", "?after_seq=-5&limit=99999999999999999999"]))
        return draw(st.sampled_from(["GET", "GET", "HEAD"])), f"/jobs/{job}/receipts{query}"
    return "GET", f"/jobs/{job}/receipts/{draw(mostly(['0' * 64], SEGMENT, one_in=2))}"


@st.composite
def proxy_headers(draw, miner, method: str, path: str, body: bytes) -> dict[str, str]:
    """Unsigned, signed, signed then tampered with, or garbage where the signature goes; for the
    receipt pages, a validator's receipts_pull (or a stranger's, or garbage)."""
    headers: dict[str, str] = {}
    job = path.split("/")[2]
    how = draw(st.sampled_from(["signed", "signed", "signed", "signed", "none", "tampered", "tampered", "garbage"]))
    if how in ("signed", "tampered"):
        key = SigningKey() if draw(st.integers(0, 9)) == 9 else miner.client
        skew_ns = draw(mostly([0], st.sampled_from([-60 * 10**9, 60 * 10**9])))
        signed_as = {"method": method, "path": path, "body": body, "job_id": job}
        if how == "tampered":
            what = draw(st.sampled_from(sorted(signed_as)))
            signed_as[what] = {"method": "POST" if method != "POST" else "GET", "path": path + "x",
                               "body": body + b"x", "job_id": JOB if job != JOB else ENDED}[what]
        headers.update(sign_request(key, clock=lambda: time.time_ns() + skew_ns, **signed_as))
    elif how == "garbage":
        headers[REQUEST_HEADER] = draw(PRINTABLE | st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()))
        headers[SIGNATURE_HEADER] = draw(PRINTABLE)
    if "/receipts" in path:
        auth = draw(st.sampled_from(["validator", "validator", "validator", "none", "stranger", "garbage"]))
        if auth in ("validator", "stranger"):
            pull = {"job_id": job if draw(st.booleans()) else draw(JOB_IDS),
                    "after_seq": draw(mostly([-1, 0, 1, 2, 10], st.integers())),
                    "limit": draw(mostly([1, 2, 100], st.integers(-3, 2000)))}
            env = seal(ALICE if auth == "validator" else EVE, "receipts_pull", pull)
            headers["Authorization"] = "Rayhorde " + env.to_token()
        elif auth == "garbage":
            headers["Authorization"] = draw(PRINTABLE.map(lambda t: f"Rayhorde {t}".strip()) | PRINTABLE)
    if draw(st.booleans()):
        headers["Content-Type"] = draw(mostly(["application/json", "text/event-stream"], PRINTABLE))
    return headers


# ---------------------------------------------------------------------------- the proxy
@FUZZ
@given(data=st.data())
def test_the_proxy_answers_any_request_to_its_doors_2xx_or_4xx_in_the_error_shape(miner, proxy, data):
    method, path = data.draw(routed(), "request")
    body = b"" if method in ("GET", "HEAD") and data.draw(st.booleans()) else data.draw(BODIES, "body")
    headers = data.draw(proxy_headers(miner, method, path, body), "headers")
    for attempt in range(2 if data.draw(st.booleans(), "replayed") else 1):
        resp = send(proxy, method, path, body, headers)
        check(resp, f"{method} {path} try {attempt + 1} ({sorted(headers)}, body {body[:100]!r})")


@FUZZ
@given(data=st.data())
def test_the_proxy_answers_unrouted_requests_4xx_in_the_error_shape(miner, proxy, data):
    method = data.draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]), "method")
    path = data.draw(st.sampled_from(["/", "/jobs", f"/jobs/{JOB}", f"/jobs/{JOB}/echo", f"/jobs/{JOB}/receipts",
                                      f"/jobs/{JOB}/volume/notes.txt"])
                     | st.lists(SEGMENT, min_size=1, max_size=3).map(lambda s: "/" + "/".join(s)), "path")
    body = data.draw(BODIES, "body")
    check(send(proxy, method, path, body, {}), f"{method} {path}")


def test_a_signed_call_to_a_jobs_internal_route_is_refused_4xx_in_the_error_shape(miner, proxy):
    path = f"/jobs/{JOB}/-/key"
    resp = send(proxy, "GET", path, b"", sign_request(miner.client, job_id=JOB, method="GET", path=path, body=b""))
    check(resp, f"signed GET {path}")


# ---------------------------------------------------------------------------- the executor API
@st.composite
def volume_reads(draw, miner) -> bytes:
    """A volume read: signed by the job's key (or not), for real and made-up jobs and names."""
    now = time.time_ns()
    read: dict[str, Any] = {
        "job_id": draw(mostly([JOB, JOB, ENDED], st.text(max_size=40))),
        "name": draw(mostly(["notes.txt", "notes.txt", "absent.txt", f"../{ENDED}/notes.txt"], st.text(max_size=40))),
        "t_ns": draw(mostly([now, now, now - 60 * 10**9], st.integers())),
    }
    sig = draw(st.sampled_from(["job key", "job key", "job key", "other key", "garbage", "none"]))
    if sig in ("job key", "other key"):
        try:
            valid = VolumeRead(**read)
        except ValueError:
            valid = None
        if valid is not None:
            key = miner.echo.side.key if sig == "job key" else SigningKey()
            read["job_sig"] = key.sign(valid.signed_bytes())
    elif sig == "garbage":
        read["job_sig"] = draw(st.text(max_size=130))
    if draw(st.integers(0, 3)) == 3:  # a field replaced by any JSON
        read[draw(st.sampled_from(sorted(read)))] = draw(JSON_VALUES | st.floats())
    return json.dumps(read).encode()


@FUZZ
@given(data=st.data())
def test_the_executor_api_answers_any_request_2xx_or_4xx_in_the_error_shape(miner, executor, data):
    door = data.draw(st.sampled_from(["run", "run", "volume", "volume", "volume", "health", "elsewhere"]), "door")
    if door == "run":
        poke = {"ticket_id": data.draw(mostly(st.text("0123456789abcdef", min_size=32, max_size=32),
                                              st.text(max_size=40))),
                "attempt": data.draw(mostly(st.integers(1, 1000), st.integers()))}
        if data.draw(st.integers(0, 3)) == 3:  # a field replaced by any JSON
            poke[data.draw(st.sampled_from(sorted(poke)))] = data.draw(JSON_VALUES | st.floats())
        method, path, body = "POST", "/v1/run", json.dumps(poke).encode()
    elif door == "volume":
        method, path, body = "POST", VOLUME_READ_PATH, data.draw(volume_reads(miner), "read")
    elif door == "health":
        method, path, body = "GET", "/v1/health", b""
    else:
        method = data.draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]), "method")
        path = data.draw(st.sampled_from(["/", "/v1", "/v1/run", VOLUME_READ_PATH, "/v1/health"])
                         | st.lists(SEGMENT, min_size=1, max_size=3).map(lambda s: "/" + "/".join(s)), "path")
        body = data.draw(BODIES, "body")
    if data.draw(st.integers(0, 9), "raw body") == 9:
        body = data.draw(BODIES, "body")
    headers = {"Content-Type": data.draw(st.sampled_from(["application/json", "application/json", "text/plain"]))}
    check(send(executor, method, path, body, headers), f"{method} {path} {body[:200]!r}")
