"""The LLM app behind the miner proxy, over real HTTP (uvicorn on 127.0.0.1), spoken to by the
official ``openai`` client signing each request: buffered and streamed chat, completions, and
the model list; greedy answers equal transformers' on the same weights; every answer's receipt
verifies and the receipts chain; the job refuses unsigned calls, bad input and wrong weights."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from cluster.protocol.identity import Hotkey
from cluster.miner.proxy import JobRoute, MinerProxy
from serve_apps import RECEIPT_HEADER, AppRefused, Receipt, RequestSigner, SigningKey, split_sse, verify_receipt
from cluster.protocol.keys import PublicKey
from serve_apps.inference.engine import chat_prompt_ids
from serve_apps.inference.openai_api import completion_prompt_ids
from serve_apps.llm import LLMApp
from tests.serve_apps.conftest import greedy_ids
from tests.serve_apps.test_proxy import Served

pytestmark = pytest.mark.integration

MINER = Hotkey.from_uri("//Bob")
JOB = "job-llm1"
PREFIX = f"/jobs/{JOB}"
CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


def llm_asgi(app: LLMApp) -> Starlette:
    async def endpoint(request):
        return await app(request)
    return Starlette(routes=[Route(PREFIX + "/{rest:path}", endpoint, methods=["GET", "POST"])])


class _Tee(httpx.SyncByteStream):
    def __init__(self, inner, record: dict) -> None:
        self.inner, self.record = inner, record
        self.chunks = None

    def __iter__(self):
        self.chunks = iter(self.inner)
        for chunk in self.chunks:
            self.record["raw"] += chunk
            yield chunk

    def close(self) -> None:
        # The openai client stops reading at "data: [DONE]" and closes the response, so the
        # receipt line the proxy sends right after it would be lost: read the stream to its end.
        for chunk in self.chunks if self.chunks is not None else self.inner:  # resumes; ends at once if read
            self.record["raw"] += chunk
        self.record["t_received"] = time.time_ns()
        self.inner.close()


class RecordingTransport(httpx.BaseTransport):
    """Keeps the exact bytes of each exchange (signed request body, raw answer) for receipts."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.exchanges: list[dict] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        record = {"sent": request.content, "t_sent": time.time_ns(), "raw": bytearray(), "path": request.url.path}
        resp = self.inner.handle_request(request)
        resp.stream = _Tee(resp.stream, record)
        self.exchanges.append(record)
        return resp

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def world(vllm_engine):
    client_key = SigningKey()
    app = LLMApp(JOB, MINER.ss58, [client_key.public.model_dump()], route_prefix=PREFIX, engine=vllm_engine,
                 weights_sha256=vllm_engine.weights_sha256)
    job = Served(llm_asgi(app))
    key_info = httpx.get(f"{job.url}{PREFIX}/-/key").json()
    proxy = MinerProxy(MINER, idle_timeout_s=30)
    job_key = PublicKey.model_validate(key_info["job_key"])
    proxy.add_job(JobRoute(job_id=JOB, upstream=job.url, client_keys=[client_key.public], job_key=job_key))
    front = Served(proxy.app)
    transport = RecordingTransport()
    http = httpx.Client(auth=RequestSigner(client_key, JOB), transport=transport, timeout=120)
    client = openai.OpenAI(base_url=f"{front.url}{PREFIX}/v1", api_key="unused", http_client=http, max_retries=0)
    yield {"client": client, "transport": transport, "job": job, "proxy": front, "job_key": job_key,
           "key_info": key_info, "app": app, "engine": vllm_engine, "http": http}
    http.close()
    front.stop()
    job.stop()


def _verify(world, receipt: Receipt, record: dict, received: bytes, prev):
    return verify_receipt(receipt, job_id=JOB, job_key=world["job_key"], miner_hotkey=MINER.ss58,
                          sent_body=record["sent"], received_body=received, client_sent_ns=record["t_sent"],
                          client_received_ns=record["t_received"], prev=prev)


@pytest.mark.slow
def test_openai_client_answers_equal_greedy_reference_and_carry_chained_receipts(world, hf_engine):
    client, transport = world["client"], world["transport"]
    model = client.models.list().data[0].id
    assert model == world["engine"].model_name
    prompt_ids = chat_prompt_ids(hf_engine.tokenizer, CHAT)
    reference = greedy_ids(hf_engine, prompt_ids, 32)

    # 1. buffered chat completion: the raw response gives the receipt header and the exact bytes
    raw = client.chat.completions.with_raw_response.create(model=model, messages=CHAT, temperature=0, max_tokens=32)
    answer = raw.parse()
    buffered_receipt = Receipt.from_b64(raw.headers[RECEIPT_HEADER])
    assert raw.http_response.content == bytes(transport.exchanges[-1]["raw"])
    extra = answer.model_extra
    assert answer.choices[0].model_extra["token_ids"] == reference
    assert answer.choices[0].message.content == hf_engine.tokenizer.decode(
        [t for t in reference if t not in hf_engine.stop_token_ids], skip_special_tokens=True)
    assert answer.choices[0].finish_reason == ("stop" if reference[-1] in hf_engine.stop_token_ids else "length")
    assert answer.usage.prompt_tokens == len(prompt_ids) and answer.usage.completion_tokens == len(reference)
    info = extra["rayhorde"]
    assert info["prompt_token_ids"] == prompt_ids and info["weights_sha256"] == world["engine"].weights_sha256
    assert info["key"] == info["request_id"] == buffered_receipt.body.request_id and info["sampler"] == "greedy"

    # 2. streamed chat completion, read by the openai client; the raw bytes kept by the transport
    t_first = None
    t0 = time.monotonic()
    chunks = []
    for chunk in client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=32,
                                                stream=True):
        chunks.append(chunk)
        if t_first is None and any(c.model_extra.get("token_ids") for c in chunk.choices):
            t_first = time.monotonic() - t0
    streamed_ids = [t for c in chunks for ch in c.choices for t in ch.model_extra["token_ids"]]
    assert streamed_ids == reference
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason
    assert chunks[0].model_extra["rayhorde"]["prompt_token_ids"] == prompt_ids
    stream_record = transport.exchanges[-1]
    content, stream_receipt = split_sse(bytes(stream_record["raw"]))
    assert content.endswith(b"data: [DONE]\n\n")
    kept = httpx.get(f"{world['proxy'].url}{PREFIX}/receipts/{stream_receipt.body.request_id}").json()
    assert Receipt.model_validate(kept) == stream_receipt  # also served by request id

    # 3. completions on a plain prompt, buffered
    prompt = "The capital of France is"
    raw_c = client.completions.with_raw_response.create(model=model, prompt=prompt, temperature=0, max_tokens=16)
    completion = raw_c.parse()
    reference_c = greedy_ids(hf_engine, completion_prompt_ids(hf_engine.tokenizer, prompt), 16)
    assert completion.choices[0].model_extra["token_ids"] == reference_c
    assert completion.choices[0].text and completion.object == "text_completion"
    completion_receipt = Receipt.from_b64(raw_c.headers[RECEIPT_HEADER])

    # every answer (the model list included) carries a receipt that verifies and follows the last
    records = transport.exchanges
    assert len(records) == 4
    models_receipt = Receipt.from_b64(world["client"].models.with_raw_response.list().headers[RECEIPT_HEADER])
    prev = None
    for record, receipt, received in [
            (records[1], buffered_receipt, bytes(records[1]["raw"])),
            (stream_record, stream_receipt, content),
            (records[3], completion_receipt, bytes(records[3]["raw"]))]:
        body = _verify(world, receipt, record, received, prev)
        assert body.seq == (prev.seq + 1 if prev else 1)  # seq 0 went to the first model list
        prev = body
    assert models_receipt.body.seq == prev.seq + 1
    print(f"\nfirst streamed token through the proxy: {t_first * 1e3:.0f} ms")


def test_sampled_answers_are_keyed_by_the_request_id(world, hf_engine):
    client = world["client"]
    model = world["engine"].model_name
    raw = client.chat.completions.with_raw_response.create(model=model, messages=CHAT, temperature=0.9,
                                                           max_tokens=12, extra_body={"top_k": 5})
    answer = raw.parse()
    info = answer.model_extra["rayhorde"]
    assert info["sampler"] == "keyed_gumbel_v1" and info["top_k"] == 5 and info["temperature"] == 0.9
    assert info["key"] == Receipt.from_b64(raw.headers[RECEIPT_HEADER]).body.request_id
    ids = answer.choices[0].model_extra["token_ids"]

    import asyncio

    async def again():
        return [t async for t in hf_engine.generate(info["prompt_token_ids"], max_tokens=12, temperature=0.9,
                                                    top_k=5, key_hex=info["key"])]
    assert asyncio.run(again()) == ids  # a verifier recomputes the sample from the signed request


def test_a_streamed_completion_with_usage_parses_and_verifies(world):
    client, transport = world["client"], world["transport"]
    chunks = list(client.completions.create(model=world["engine"].model_name, prompt="Once upon a time",
                                            temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    ids = [t for c in chunks for ch in c.choices for t in ch.model_extra["token_ids"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids) > 0
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    record = transport.exchanges[-1]
    content, receipt = split_sse(bytes(record["raw"]))
    assert _verify(world, receipt, record, content, None).seq == 0


def test_bad_requests_are_refused_with_openai_errors(world):
    client, model = world["client"], world["engine"].model_name
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=CHAT, max_tokens=5000)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=CHAT, n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=CHAT, extra_body={"top_k": 50})
    assert err.value.body["param"] == "top_k"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=CHAT, extra_body={"temperature": "hot"})
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    resp = world["http"].post(f"{world['proxy'].url}{PREFIX}/v1/chat/completions", content=b'{"model": ')
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_a_direct_unsigned_call_is_refused_by_the_app_itself(world):
    url = f"{world['job'].url}{PREFIX}/v1/chat/completions"
    r = httpx.post(url, json={"model": world["engine"].model_name, "messages": CHAT})
    assert r.status_code == 401 and r.json()["error"]["reason"] == "unsigned"
    with httpx.Client(auth=RequestSigner(SigningKey(), JOB)) as stranger:
        refused = stranger.get(f"{world['job'].url}{PREFIX}/v1/models").json()["error"]
        assert refused["reason"] == "unknown_client_key"


def test_the_key_route_names_the_weights(world):
    info = world["key_info"]
    assert info["job_id"] == JOB and info["weights_sha256"] == world["engine"].weights_sha256


def test_wrong_weights_make_the_app_refuse_to_start(vllm_engine, llm_model_dir):
    with pytest.raises(AppRefused) as err:
        LLMApp(JOB, MINER.ss58, [], engine=vllm_engine, weights_sha256="0" * 64)
    assert err.value.reason == "weights_digest_mismatch"
    t0 = time.monotonic()  # the real start path refuses before it loads any engine
    with pytest.raises(AppRefused) as err:
        LLMApp(JOB, MINER.ss58, [], engine="transformers", weights_sha256="1" * 64)
    assert err.value.reason == "weights_digest_mismatch" and time.monotonic() - t0 < 10
