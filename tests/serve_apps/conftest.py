"""Session fixtures for the LLM app's tests: the fp32 model folder, ONE vLLM engine and one
transformers engine per session (each takes seconds and a GiB or more; two cores are shared by
everything). Engines start only when a test asks for them."""

from __future__ import annotations

import os

# Read when vLLM is imported / builds its engine: in-process engine, loopback, small KV cache.
from serve_apps.inference.vllm_engine import apply_vllm_env

apply_vllm_env()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def llm_model_dir():
    from serve_apps.inference.model import ensure_model

    return ensure_model()  # the default cache ($RAYHORDE_MODEL_CACHE or ~/.cache/rayhorde/models)


@pytest.fixture(scope="session")
def llm_weights_digest(llm_model_dir) -> str:
    from cluster.protocol.whitelist import weights_digest

    return weights_digest(llm_model_dir)


@pytest.fixture(scope="session")
def vllm_engine(llm_model_dir, llm_weights_digest):
    from serve_apps.inference.vllm_engine import VLLMEngine

    engine = VLLMEngine(llm_model_dir, weights_sha256=llm_weights_digest)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def hf_engine(llm_model_dir, llm_weights_digest):
    from serve_apps.inference.transformers_engine import TransformersEngine

    engine = TransformersEngine(llm_model_dir, dtype="float32", weights_sha256=llm_weights_digest)
    yield engine
    engine.close()


def assert_error(resp, status: int, reason: str) -> dict:
    """``resp`` is an error answer in rayhorde's one shape ``{"error": {"reason", "message", ...}}``
    (cluster.protocol.http.error_body); returns the inner object."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert list(body) == ["error"], body
    err = body["error"]
    assert err["reason"] == reason and isinstance(err["message"], str) and err["message"], err
    return err


def greedy_ids(engine, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The reference: an engine's greedy output ids for ``prompt_ids`` (run to completion)."""
    import asyncio

    async def go():
        return [t async for t in engine.generate(prompt_ids, max_tokens=max_tokens, temperature=0, top_k=20,
                                                 key_hex=None)]
    return asyncio.run(go())


@pytest.fixture(scope="module")
def streams(stack):
    """The streaming client on the session's local stack (the user's capability)."""
    from serve_apps import Streams

    s = Streams(stack.validator_url, stack.capability)
    yield s
    s.close()


@pytest.fixture(scope="module")
def key():
    """A client key registered with this module's streaming jobs."""
    from serve_apps import SigningKey

    return SigningKey()
