"""One error shape on every HTTP door: validator-core, the LLM app and the agent's executor API
answer a refusal as ``{"error": {"reason", "message", ...}}`` (the miner proxy and the echo app:
test_proxy.py), and :func:`cluster.protocol.http.raise_for_error` maps the reason back to its
error class. The LLM
app's HTTP layer runs here on an engine that refuses to generate: every request below is refused
before the model would be needed. In-process (httpx over ASGI), no server, no model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from cluster.errors import Refused, RequestRefused, SignatureRejected, TicketRefused
from cluster.protocol.http import raise_for_error
from cluster.protocol.identity import Hotkey
from cluster.settings import ValidatorSettings
from cluster.validator.app import build_app
from serve_apps import RequestSigner, SigningKey
from serve_apps.inference.engine import InferenceEngine
from serve_apps.llm import LLMApp
from tests.serve_apps.conftest import assert_error

MINER = Hotkey.from_uri("//Bob")
JOB = "job-shape"
PREFIX = f"/jobs/{JOB}"


class InProcess(httpx.BaseTransport):
    """A synchronous httpx transport into an ASGI app (the ``openai`` client takes only a sync
    ``httpx.Client``; httpx's own ASGI transport is async)."""

    def __init__(self, app) -> None:
        self.inner = httpx.ASGITransport(app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def go() -> httpx.Response:
            resp = await self.inner.handle_async_request(request)
            return httpx.Response(resp.status_code, headers=resp.headers, content=await resp.aread())
        return asyncio.run(go())


def in_process(app, base_url: str) -> httpx.Client:
    return httpx.Client(transport=InProcess(app), base_url=base_url)


class _Untouched:
    """Stands in for ValidatorCore: any part may be looked up, none may be called (but its
    settings, which the app reads to size its limits)."""

    settings = ValidatorSettings()

    def __getattr__(self, name: str) -> "_Untouched":
        return self

    def __call__(self, *args, **kwargs):
        raise AssertionError("a refused request reached validator-core's core")


def test_validator_core_refusals_are_the_one_error_shape():
    with in_process(build_app(_Untouched()), "http://validator") as c:  # each refusal comes before the core
        unsigned = c.post("/v1/tickets/fetch", json={"ticket_id": "t"})
        assert "signed envelope" in assert_error(unsigned, 401, "unsigned")["message"]
        with pytest.raises(SignatureRejected):
            raise_for_error(unsigned)
        bad_query = c.get("/v1/scores", params={"closed": 1000})
        assert "closed: Input should be less than or equal to 100" in assert_error(bad_query, 422,
                                                                                 "malformed")["message"]
        with pytest.raises(Refused):
            raise_for_error(bad_query)
        malformed = c.post("/v1/admission/challenge", json={})
        assert "miner_hotkey" in assert_error(malformed, 422, "malformed")["message"]


class _NoModel(InferenceEngine):
    """An engine with a name and no model: a request that reaches it fails the test."""

    model_name = "no-model"
    model_dir = Path("/nonexistent")
    weights_sha256 = "0" * 64
    tokenizer = None
    stop_token_ids = frozenset()

    def _generate(self, req):
        raise AssertionError("a refused request reached the engine")

    def close(self) -> None:
        pass


@pytest.fixture
def llm():
    key = SigningKey()
    app = LLMApp(JOB, MINER.ss58, [key.public.model_dump()], route_prefix=PREFIX, engine=_NoModel())

    async def endpoint(request):
        return await app(request)

    asgi = Starlette(routes=[Route(PREFIX + "/{rest:path}", endpoint, methods=["GET", "POST"])])
    with in_process(asgi, "http://job") as client:
        yield client, key


def test_llm_app_refusals_are_the_one_error_shape_with_openai_keys(llm):
    client, key = llm
    unsigned = client.post(f"{PREFIX}/v1/chat/completions", json={"model": "no-model", "messages": []})
    err = assert_error(unsigned, 401, "unsigned")
    assert err["code"] == "unsigned" and err["type"] == "invalid_request_error"
    with pytest.raises(SignatureRejected):
        raise_for_error(unsigned)
    client.auth = RequestSigner(SigningKey(), JOB)
    foreign = client.get(f"{PREFIX}/v1/models")
    assert_error(foreign, 403, "unknown_client_key")
    with pytest.raises(RequestRefused):
        raise_for_error(foreign)
    client.auth = RequestSigner(key, JOB)
    assert_error(client.get(f"{PREFIX}/v1/nowhere"), 404, "not_found")
    broken = client.post(f"{PREFIX}/v1/chat/completions", content=b'{"model": ')
    assert assert_error(broken, 400, "invalid_json")["code"] == "invalid_json"


def test_the_openai_client_reads_the_llm_apps_errors(llm):
    openai = pytest.importorskip("openai")
    client, key = llm
    client.auth = RequestSigner(key, JOB)
    llm_client = openai.OpenAI(base_url=f"http://job{PREFIX}/v1", api_key="unused", http_client=client,
                               max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        llm_client.chat.completions.create(model="no-model", messages=messages, n=2)
    assert err.value.param == "n" and err.value.code == "invalid_value" and "n:" in err.value.message
    assert err.value.body["reason"] == "invalid_value"
    with pytest.raises(openai.NotFoundError) as err:
        llm_client.chat.completions.create(model="gpt-4", messages=messages)
    assert err.value.code == "model_not_found" and "'gpt-4' is not served here" in err.value.message
    client.auth = None
    with pytest.raises(openai.AuthenticationError) as err:
        llm_client.models.list()
    assert err.value.body["reason"] == "unsigned"


class _RefusingAgent:
    """Stands in for AgentCore: refuses every ticket, as it does one addressed to another miner."""

    def run_ticket(self, ticket_id: str, attempt: int):
        raise TicketRefused("wrong_miner", f"ticket {ticket_id} is addressed to another miner", status_code=403)


def test_the_agents_executor_api_refuses_in_the_one_shape_and_the_task_reads_it(monkeypatch):
    from cluster.miner.executor_api import build_executor_app
    from jobs._private import task

    ticket = "ab" * 16
    with in_process(build_executor_app(_RefusingAgent()), "http://agent") as client:
        assert_error(client.post("/v1/run", json={"ticket_id": ticket, "attempt": 1}), 409, "wrong_miner")
        assert_error(client.post("/v1/run", json={"ticket_id": "x", "attempt": 1}), 422, "malformed")
        monkeypatch.setenv(task.AGENT_SOCKET_ENV, "/agent.sock")
        monkeypatch.setitem(task._clients, "/agent.sock", client)  # the task's client for that socket
        assert task.organic_task(ticket, 1) == {"ok": False, "reason": "wrong_miner",
                                                "message": f"ticket {ticket} is addressed to another miner"}
