"""Every answer's receipt is kept, whoever leaves early and whatever restarts: the official
``openai`` client closes its stream at ``data: [DONE]`` (before the job's receipt event), other
clients drop mid-stream, and the agent restarts between two bursts; validator-core's collector
then pulls every answer with its receipt, the chain without a gap, and the verifier passes them.

The LLM app (vLLM fp32 on CPU, the test model) behind a real miner proxy whose answers are kept in
the agent's receipt book on disk; the restart is a new proxy (a new agent process) on the same
book."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from cluster.miner.proxy import JobRoute, MinerProxy
from cluster.miner.receipt_book import ReceiptBook
from cluster.protocol.identity import Hotkey
from cluster.protocol.keys import PublicKey
from cluster.verification.collector import StreamSource, pull
from serve_apps import RequestSigner, SigningKey
from serve_apps.llm import LLMApp
from tests.serve_apps.test_llm_app import CHAT, JOB, MINER, PREFIX, llm_asgi
from tests.serve_apps.test_proxy import Served
from tests.support.net import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
VALIDATOR = Hotkey.from_uri("//Alice")


def burst(proxy_url: str, client_key: SigningKey, model: str, *, at_done: int, mid_stream: int) -> None:
    http = httpx.Client(auth=RequestSigner(client_key, JOB), timeout=120)
    client = openai.OpenAI(base_url=f"{proxy_url}{PREFIX}/v1", api_key="unused", http_client=http, max_retries=0)
    try:
        for _ in range(at_done):  # the openai client reads to [DONE], then closes the response
            chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, stream=True))
            assert chunks
        for _ in range(mid_stream):  # gone after the first chunk
            stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, stream=True)
            next(iter(stream))
            stream.close()
    finally:
        http.close()


def test_early_closes_and_an_agent_restart_leave_every_receipt_collected_and_verified(vllm_engine, tmp_path: Path):
    client_key = SigningKey()
    app = LLMApp(JOB, MINER.ss58, [client_key.public.model_dump()], route_prefix=PREFIX, engine=vllm_engine,
                 weights_sha256=vllm_engine.weights_sha256)
    job = Served(llm_asgi(app))
    job_key = PublicKey.model_validate(httpx.get(f"{job.url}{PREFIX}/-/key").json()["job_key"])
    book_path = tmp_path / "receipts.db"

    def agent() -> tuple[MinerProxy, Served]:
        proxy = MinerProxy(MINER, idle_timeout_s=60, validator_hotkey=VALIDATOR.ss58, book=ReceiptBook(book_path))
        proxy.add_job(JobRoute(job_id=JOB, upstream=job.url, client_keys=[client_key.public], job_key=job_key))
        return proxy, Served(proxy.app)

    proxy, front = agent()
    try:
        burst(front.url, client_key, vllm_engine.model_name, at_done=25, mid_stream=10)
        wait_for(lambda: proxy.book.count(JOB) == 35, 60, "the first burst's receipts kept")
        front.stop()  # the agent restarts: its memory is gone, its book is not
        proxy.book.close()
        proxy, front = agent()
        burst(front.url, client_key, vllm_engine.model_name, at_done=25, mid_stream=10)
        wait_for(lambda: proxy.book.count(JOB) == 70, 60, "the second burst's receipts kept")

        source = StreamSource(job_id=JOB, miner_hotkey=MINER.ss58, proxy_url=front.url, job_key=job_key,
                              client_keys=[client_key.public], route_prefix=PREFIX,
                              weights_sha256=vllm_engine.weights_sha256)
        claims, failures = [], []
        with httpx.Client(timeout=30) as http:
            while True:  # what validator-core's collect step does, page after page
                got = pull(source, VALIDATOR, http, limit=50)
                claims += got.claims
                failures += got.failures
                source.after_seq, source.prev = got.last_seq, got.last_body
                if got.done:
                    break
            assert pull(source, VALIDATOR, http, limit=50).claims == []  # the next pass: nothing new...
        assert failures == [] and [c.receipt.body.seq for c in claims] == list(range(70))  # no chain gap
        assert proxy.book.count(JOB) == 0  # ...and what was pulled is gone from the miner's disk
    finally:
        front.stop()
        job.stop()

    from cluster.settings import ValidatorSettings
    from cluster.verification.verifier import Verifier

    verifier = Verifier(backend="transformers", dtype="float32", weights_sha256=vllm_engine.weights_sha256,
                        model_dir=vllm_engine.model_dir)
    try:
        verdicts = verifier.verify_batch(claims, ValidatorSettings().verify_margin)
    finally:
        verifier.close()
    assert [v.reason for v in verdicts if not v.ok] == []
