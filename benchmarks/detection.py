"""Detection benchmark of the prefill verifier: honest answers vs cheats, two dtypes.

``python -m benchmarks.detection [--honest N] [--tokens 128] [--cheats M]`` prints a table
(answers per class, detection rate per class and verifier, false alarms, near-ties, check time
vs regeneration time) and the lines ``BENCH detection_false_alarm_rate``,
``BENCH detection_miss_rate``, ``BENCH verify_speedup_vs_regen`` (one answer at a time: how a
validator re-checks a sampled answer), ``BENCH verify_speedup_vs_regen_batched`` (16 at a time),
``BENCH verify_pairs_per_s`` (answers verified per second by one vLLM verifier, batched) and
``BENCH detection_lowprec_batch_answers`` (answers a batch needs before the batch statistic
catches a 4-bit copy).

Claims are real (``tests.support.llm_claims``, ``tests.support.cheats``): every request is signed
by a client key, answered by the LLM app in-process (its own bytes, JSON or SSE, its half of the receipt)
and counter-signed by a miner hotkey; cheats answer the very same signed requests (same request
id and sampling key) with a cheating engine inside the same app. Generation runs on the vLLM
engine directly (no HTTP), many requests in flight at once.

Sets: honest answers from the vLLM float32 engine and (a quarter) from a vLLM bfloat16 engine
(an honest miner on other hardware), greedy and sampled (keyed Gumbel, T 0.7-1.0, top_k 5-20),
chat (some with a system prompt the question depends on) and completions, buffered and streamed;
a separate honest calibration set (other prompts, also a quarter from bfloat16) sets the margin
for both verifiers (vLLM float32, transformers bfloat16) and the batch statistic's thresholds. Cheat classes: a token
swapped (and the answer continued), bytes edited after signing, an answer cut short, a forced
stop, another temperature, another key, the system prompt dropped, the context truncated, a
model with 6 of its 30 layers removed, another model (Gemma 3 270M, re-tokenised), and two
lower-precision copies (4-bit and 6-bit symmetric groups of 32), which the batch statistic is for.
An engine-made cheat whose answer is token for token the honest one (nothing changed) is dropped
from its class and counted in the table ("identical to honest").

vLLM engines share this process one at a time, except the scoring engine, which is built while
the generator is alive (a guest: it closes first). Nothing asserts a time: figures only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the table goes to stdout; vLLM logs there too

TOPICS = ["the sea", "dragons", "Python lists", "the moon", "coffee", "trains", "a lost key", "winter", "robots",
          "gardening", "jazz", "volcanoes", "bread baking", "bicycles", "the desert", "chess", "honey bees",
          "lighthouses", "paper airplanes", "thunderstorms", "the Roman empire", "penguins", "clocks", "rivers",
          "space travel", "tea", "mountains", "libraries", "soap bubbles", "elephants", "origami", "the internet",
          "rainforests", "pianos", "comets", "recycling", "castles", "octopuses", "maps", "snow"]
TEMPLATES = ["Tell me something interesting about {t}.", "Write a short poem about {t}.",
             "Explain {t} to a child.", "What are three facts about {t}?", "Write a story that involves {t}.",
             "Why do people like {t}?", "Describe {t} in detail.", "Give me advice related to {t}."]
COMPLETIONS = ["Here is a short essay about {t}:", "The most surprising thing about {t} is",
               "Once upon a time, near {t},", "A beginner's guide to {t}. First,"]
PEOPLE = [("Zorblax", "Lisbon", "a green parrot called Pickles", "baker"),
          ("Mirela", "Oslo", "a grey cat called Biscuit", "pilot"),
          ("Tobias", "Nairobi", "a small dog called Rocket", "teacher"),
          ("Ingrid", "Lima", "a turtle called Pebble", "chemist")]
QUESTIONS = ["What is my name?", "Where do I live?", "What is my pet called?", "What is my job?",
             "Tell me about myself.", "Write a short greeting for me."]
SAMPLED = [(0.8, 20), (0.7, 10), (1.0, 5), (0.9, 20)]


def system_prompt(person) -> str:
    name, city, pet, job = person
    return f"The user's name is {name}. {name} lives in {city}, owns {pet} and works as a {job}."


def requests(n: int, offset: int, tokens: int) -> list[tuple[str, dict, dict]]:
    """``n`` distinct requests (route, body without model, tags): greedy and sampled, chat (a third
    with a system prompt the question needs) and completions, buffered and streamed."""
    from tests.support.llm_claims import CHAT, COMPLETIONS as COMP

    out = []
    for i in range(offset, offset + n):
        sampled = i % 2 == 1
        T, k = SAMPLED[(i // 2) % len(SAMPLED)] if sampled else (0, 20)
        body = {"max_tokens": tokens, "temperature": T, "top_k": k, "stream": i % 3 == 0}
        kind = i % 6
        t = TOPICS[(i * 7) % len(TOPICS)]
        if kind in (0, 3):
            person = PEOPLE[i % len(PEOPLE)]
            q = QUESTIONS[(i // 6) % len(QUESTIONS)]
            body["messages"] = [{"role": "system", "content": system_prompt(person)}, {"role": "user", "content": q}]
            out.append((CHAT, body, {"system": True, "sampled": sampled}))
        elif kind == 5:
            body["prompt"] = COMPLETIONS[(i // 6) % len(COMPLETIONS)].format(t=t)
            out.append((COMP, body, {"system": False, "sampled": sampled}))
        else:
            q = TEMPLATES[(i // 6 + kind) % len(TEMPLATES)].format(t=t) + f" (#{i})"
            body["messages"] = [{"role": "user", "content": q}]
            out.append((CHAT, body, {"system": False, "sampled": sampled}))
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.detection")
    ap.add_argument("--honest", type=int, default=200, help="honest benchmark answers (>= 8)")
    ap.add_argument("--calibration", type=int, default=None, help="honest calibration answers (default N/4, >= 24)")
    ap.add_argument("--cheats", type=int, default=None, help="answers per cheat class (default N/8, >= 8)")
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens of every request")
    ap.add_argument("--timing", type=int, default=8, help="answers timed one at a time (check vs regeneration)")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = ap.parse_args(argv)
    n = max(8, args.honest)
    n_cal = args.calibration or max(24, n // 4)
    m = args.cheats or max(8, n // 8)
    t_all = time.monotonic()

    from serve_apps.inference.vllm_engine import apply_vllm_env

    apply_vllm_env()
    from cluster.protocol.identity import Hotkey
    from tests.support import cheat_models, cheats, llm_claims
    from cluster.verification.calibration import (
        batch_size_needed, batch_statistic, calibrate_batch, calibrate_margin, measure_honest,
    )
    from cluster.verification.verifier import Verifier
    from cluster.protocol.keys import SigningKey
    from serve_apps.inference.model import ensure_model
    from serve_apps.inference.vllm_engine import VLLMEngine
    from cluster.protocol.whitelist import weights_digest

    folder = ensure_model()
    digest = weights_digest(folder)
    model_name = folder.name
    client, miner, job_id = SigningKey(), Hotkey.from_uri("//Bob"), "job-detect"

    def job(engine):
        return llm_claims.InProcessJob(engine, job_id=job_id, miner=miner, client=client, max_skew_s=7 * 86400)

    def signed(items):
        return [llm_claims.sign(client, job_id, route, {"model": model_name, **body}) for route, body, _ in items]

    cal_items = requests(n_cal, 10_000, args.tokens)
    bench_items = requests(n, 0, args.tokens)
    cal_reqs, bench_reqs = signed(cal_items), signed(bench_items)
    tags = {r.request_id: tags for r, (_, _, tags) in zip(bench_reqs, bench_items)}
    rng = random.Random(1)
    n_bf16 = n // 4  # an honest miner on bfloat16 hardware answers these (and a quarter of calibration)
    bf16_ids = {r.request_id for r in rng.sample(bench_reqs, n_bf16) + rng.sample(cal_reqs, n_cal // 4)}
    # twisted cheats answer float32 requests, so "no effect" below compares like with like
    sampled_reqs = [r for r in bench_reqs if tags[r.request_id]["sampled"] and r.request_id not in bf16_ids]
    system_reqs = [r for r in bench_reqs if tags[r.request_id]["system"] and r.request_id not in bf16_ids]

    def pick(pool, k):
        return rng.sample(pool, min(k, len(pool)))

    claims: dict[str, list] = defaultdict(list)  # class -> claims
    timings: dict[str, float] = {}

    # 1. honest answers from a bfloat16 engine, then the cheat folders, one vLLM engine at a time
    t0 = time.monotonic()
    eng = VLLMEngine(folder, dtype="bfloat16", weights_sha256=digest)
    log(f"vLLM bfloat16 generator up in {eng.start_s:.1f} s")
    claims["honest"] += job(eng).answer_many([r for r in bench_reqs if r.request_id in bf16_ids])
    calibration = job(eng).answer_many([r for r in cal_reqs if r.request_id in bf16_ids])
    eng.close()
    timings["gen_honest_bf16_s"] = time.monotonic() - t0
    cheat_folders = {"layers_removed": cheat_models.fewer_layers_folder(folder, keep=24),
                     "lowprec_q4": cheat_models.low_precision_folder(folder, bits=4, group=32),
                     "lowprec_q6": cheat_models.low_precision_folder(folder, bits=6, group=32)}
    for name, path in cheat_folders.items():
        t0 = time.monotonic()
        eng = VLLMEngine(path, model_name=model_name, weights_sha256=digest)  # lies: claims the whitelisted digest
        claims[name] = job(eng).answer_many(pick(bench_reqs, m if name == "layers_removed" else max(m, 32)))
        eng.close()
        timings[f"gen_{name}_s"] = time.monotonic() - t0
        log(f"{name}: {len(claims[name])} answers in {timings[f'gen_{name}_s']:.1f} s")

    # 2. the honest float32 engine: honest answers (calibration apart), twisted and edited cheats
    gen = VLLMEngine(folder, weights_sha256=digest)
    honest_job = job(gen)
    t0 = time.monotonic()
    calibration += honest_job.answer_many([r for r in cal_reqs if r.request_id not in bf16_ids])
    fp32_reqs = [r for r in bench_reqs if r.request_id not in bf16_ids]
    claims["honest"] += honest_job.answer_many(fp32_reqs)
    timings["gen_honest_fp32_s"] = time.monotonic() - t0
    timings["gen_honest_fp32_answers"] = len(cal_reqs) - n_cal // 4 + len(fp32_reqs)
    log(f"honest: {len(claims['honest'])} + {len(calibration)} calibration answers")
    by_id = {c.request_id: c for c in claims["honest"]}
    tok = gen.tokenizer

    twists = {
        "wrong_temperature": (sampled_reqs, lambda r: {"temperature": min(2.0, r.temperature * 2)}),
        "wrong_key": (sampled_reqs, lambda r: {"key_hex": hashlib.sha256(r.key_hex.encode()).hexdigest()}),
        "system_prompt_dropped": (system_reqs, lambda r: {
            "prompt_ids": cheats.drop_system_prompt(r.prompt_token_ids, tok)}),
        "context_truncated": (system_reqs, lambda r: {
            "prompt_ids": r.prompt_token_ids[len(r.prompt_token_ids) // 2:]}),
    }
    for name, (pool, twist) in twists.items():
        claims[name] = job(cheats.TwistedEngine(gen, twist)).answer_many(pick(pool, m))
    log("twisted cheats done")

    # 3. the verifiers; the margin from the calibration set; cheats made from honest answers
    hf = Verifier(folder, backend="transformers", dtype="bfloat16", weights_sha256=digest)
    vl = Verifier(folder, backend="vllm", dtype="float32", weights_sha256=digest)  # a guest of gen's process
    verifiers = [vl, hf]
    log(f"verifiers up: vLLM fp32 {vl.start_s:.1f} s, transformers bf16 {hf.start_s:.1f} s")
    t0 = time.monotonic()
    margin = calibrate_margin(calibration, verifiers)
    timings["calibrate_s"] = time.monotonic() - t0
    log(f"margin {margin:.4f}")
    maker = cheats.CheatMaker(gen, hf, margin, seed=3)
    base = pick([by_id[r.request_id] for r in fp32_reqs], m)
    scripted = (("token_swapped", maker.swap), ("cut_short", maker.truncate), ("forced_stop", maker.forced_stop))
    for name, make in scripted:
        script = {}
        for c in base:
            try:
                script[c.request_id] = make(c)[0]
            except ValueError:
                pass  # an answer with no suitable position: skipped
        scripted = [c for c in base if c.request_id in script]
        claims[name] = job(cheats.ScriptedEngine(gen, script)).reanswer_many(scripted)
    claims["bytes_edited"] = [honest_job.resign(c, cheats.edit_text(c)) for c in base]
    log("scripted cheats done")
    try:
        other = cheats.OtherModelEngine(gen, cheat_models.gemma_folder())
        t0 = time.monotonic()
        claims["other_model"] = job(other).reanswer_many(pick(claims["honest"], min(m, 8)))
        timings["gen_other_model_s"] = time.monotonic() - t0
        log(f"other model: {len(claims['other_model'])} answers in {timings['gen_other_model_s']:.1f} s")
    except (ImportError, RuntimeError) as exc:
        log(f"other model skipped: {exc}")

    # A cheat whose answer is token for token the honest answer to the same signed request changed
    # nothing a user or any verifier can see (a context cut that lost nothing the answer needed, a
    # temperature at which the top choice still wins every draw): not counted as a cheat, reported.
    no_effect: dict[str, int] = {}
    # (Lower-precision copies stay whole: the batch statistic judges everything such a copy serves.)
    for name in [k for k in claims if k not in ("honest", "token_swapped", "cut_short", "forced_stop",
                                                "bytes_edited") and not k.startswith("lowprec")]:
        kept = [c for c in claims[name] if c.request_id not in by_id
                or llm_claims.answer_ids(c) != llm_claims.answer_ids(by_id[c.request_id])]
        no_effect[name] = len(claims[name]) - len(kept)
        claims[name] = kept
    log(f"cheats identical to the honest answer (dropped): {no_effect}")

    # 4. verify everything with both verifiers
    verdicts: dict[str, dict[str, list]] = {}
    for v in verifiers:
        verdicts[v.label] = {}
        for name, cs in claims.items():
            t0 = time.monotonic()
            verdicts[v.label][name] = v.verify_batch(cs, margin)
            if name == "honest":
                timings[f"verify_honest_{v.label}_s"] = time.monotonic() - t0
        log(f"{v.label}: verified (honest in {timings[f'verify_honest_{v.label}_s']:.1f} s)")

    # 5. timing: prefill check vs regeneration, same answers, one at a time and 16 at a time
    sizes = {v.request_id: v.checked_tokens for v in verdicts[vl.label]["honest"]}
    timed = sorted((by_id[r.request_id] for r in fp32_reqs), key=lambda c: -sizes[c.request_id])
    timed = timed[:max(args.timing, 16)]
    ratios, checks, regens = [], [], []
    for c in timed[:args.timing]:
        p = vl.prepare(c)
        t0 = time.perf_counter()
        regen = _regenerate(gen, [p])
        t_regen = time.perf_counter() - t0
        assert regen[0] == p.output_ids, "regeneration differs from the float32 answer"
        t0 = time.perf_counter()
        vl.verify_batch([c], margin)
        t_check = time.perf_counter() - t0
        ratios.append(t_regen / t_check)
        checks.append(t_check)
        regens.append(t_regen)
    batch = timed[:16]
    t0 = time.perf_counter()
    _regenerate(gen, [vl.prepare(c) for c in batch])
    t_regen_b = time.perf_counter() - t0
    t0 = time.perf_counter()
    vl.verify_batch(batch, margin)
    t_check_b = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf.verify_batch(batch, margin)
    t_check_hf = time.perf_counter() - t0
    cal_split = [[c for c in calibration if (c.request_id in bf16_ids) == bf16] for bf16 in (False, True)]
    cal_samples = {v.label: [measure_honest(v, part, margin)[0] for part in cal_split if part] for v in verifiers}
    vl.close()  # the guest first (see scoring_vllm)
    gen.close()
    hf.close()

    # 6. figures
    honest_n = len(claims["honest"])
    per_answer = [k for k in claims if k != "honest" and not k.startswith("lowprec")]
    rows, figures = [], {"margin": margin, "honest_answers": honest_n, "calibration_answers": len(calibration)}
    false_alarms = missed = cheats_total = 0
    for label, by_class in verdicts.items():
        hv = by_class["honest"]
        fa = sum(not v.ok for v in hv)
        false_alarms += fa
        positions = sum(v.checked_tokens for v in hv)
        ties = sum(v.near_ties for v in hv) / max(positions, 1)
        figures[f"{label}_false_alarms"] = fa
        figures[f"{label}_near_tie_rate"] = ties
        figures[f"{label}_honest_mismatch_rate"] = sum(v.mismatches for v in hv) / max(positions, 1)
        figures[f"{label}_honest_max_gap"] = max(v.max_gap for v in hv)
        rows.append((label, "honest", len(hv), f"{fa} false alarms", f"near-tie rate {ties:.3f}",
                     _reasons(hv)))
        for name in claims:
            if name == "honest":
                continue
            cv = by_class[name]
            caught = sum(not v.ok for v in cv)
            if name in per_answer:
                missed += len(cv) - caught
                cheats_total += len(cv)
            figures[f"{label}_{name}_detected"] = caught / max(len(cv), 1)
            figures[f"{name}_no_effect"] = no_effect.get(name, 0)
            same = f"+{no_effect[name]} identical to honest" if no_effect.get(name) else ""
            rows.append((label, name, len(cv), f"{caught}/{len(cv)} caught ({caught / max(len(cv), 1):.0%})",
                         same, _reasons(cv)))

    # the batch statistic: thresholds from the calibration set; honest batches vs low-precision batches
    batch_rows = []
    for v in verifiers:
        label = v.label
        cal = calibrate_batch(cal_samples[label])
        hv = verdicts[label]["honest"]
        for name in [k for k in claims if k.startswith("lowprec")]:
            cv = verdicts[label][name]
            rate = sum(x.mismatches for x in cv) / max(sum(x.checked_tokens for x in cv), 1)
            toks = sum(x.checked_tokens for x in cv) / max(len(cv), 1)
            need = batch_size_needed(rate, toks, cal)
            honest_parts = [[x for x in hv if (x.request_id in bf16_ids) == bf16] for bf16 in (False, True)]
            emp = _empirical_batch(cv, [part for part in honest_parts if part], cal, batch_statistic)
            figures[f"{label}_{name}_mismatch_rate"] = rate
            figures[f"{label}_{name}_batch_answers"] = need
            figures[f"{label}_{name}_batch_answers_empirical"] = emp[0]
            batch_rows.append((label, name, f"{rate:.3f}", f"{cal.honest_rate:.4f}", need, emp[0], f"{emp[1]:.3f}"))

    print(f"\nDetection benchmark: {honest_n} honest answers ({n_bf16} from a bfloat16 engine) + "
          f"{len(calibration)} for calibration, max_tokens {args.tokens}; margin {margin:.4f} (calibrated, "
          f"both verifiers)")
    print(f"{'verifier':<22} {'class':<22} {'answers':>7}  result")
    for label, name, count, result, extra, reasons in rows:
        print(f"{label:<22} {name:<22} {count:>7}  {result:<28} {extra:<24} {reasons}")
    print("\nbatch statistic (mismatch rate vs the honest calibration bound):")
    print(f"{'verifier':<22} {'class':<12} {'rate':>6} {'honest p0':>9} {'batch (model)':>14} "
          f"{'batch (bootstrap)':>18} {'honest FA at that size':>22}")
    for row in batch_rows:
        print(f"{row[0]:<22} {row[1]:<12} {row[2]:>6} {row[3]:>9} {str(row[4]):>14} {str(row[5]):>18} "
              f"{row[6]:>22}")
    per_check, per_regen = statistics.median(checks), statistics.median(regens)
    timed_tokens = statistics.mean(sizes[c.request_id] for c in timed[:args.timing])
    print(f"\ntiming (vLLM fp32 on this CPU): one answer at a time: check {per_check * 1e3:.0f} ms, regeneration "
          f"{per_regen * 1e3:.0f} ms (median of {len(ratios)}, {timed_tokens:.0f} tokens/answer); {len(batch)} at a "
          f"time: check {t_check_b:.2f} s (transformers bf16 {t_check_hf:.2f} s), regeneration {t_regen_b:.2f} s")
    print(f"generation: {json.dumps({k: round(v, 1) for k, v in timings.items()})}; total "
          f"{time.monotonic() - t_all:.0f} s\n")

    total_honest = sum(len(by_class["honest"]) for by_class in verdicts.values())
    fa_rate = false_alarms / max(total_honest, 1)
    miss_rate = missed / max(cheats_total, 1)
    speedup = statistics.median(ratios)
    pairs = honest_n / timings[f"verify_honest_{vl.label}_s"]
    q4 = figures.get(f"{vl.label}_lowprec_q4_batch_answers_empirical")
    _bench("detection_false_alarm_rate", fa_rate, "ratio",
           f"{false_alarms}/{total_honest} honest verdicts, 2 verifiers")
    _bench("detection_miss_rate", miss_rate, "ratio", f"{missed}/{cheats_total} per-answer cheats passed, 2 verifiers")
    _bench("verify_speedup_vs_regen", speedup, "x", "one answer at a time, median")
    _bench("verify_speedup_vs_regen_batched", t_regen_b / t_check_b, "x", f"{len(batch)} answers at a time")
    _bench("verify_pairs_per_s", pairs, "pairs/s", f"vLLM fp32, {honest_n} honest answers in one verify_batch")
    _bench("detection_lowprec_batch_answers", q4 if q4 is not None else float("nan"), "answers",
           "4-bit copy, vLLM fp32 verifier, 95% of batches caught")
    figures.update(false_alarm_rate=fa_rate, miss_rate=miss_rate, speedup_one=speedup,
                   speedup_batched=t_regen_b / t_check_b, pairs_per_s=pairs, timings=timings)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1, default=str)
    return 0


def _regenerate(gen, prepared) -> list[list[int]]:
    """What re-checking by regeneration costs: the same requests generated again (same key)."""
    import asyncio

    async def one(p):
        return [t async for t in gen.generate(p.prompt_ids, max_tokens=p.max_tokens, temperature=p.temperature,
                                              top_k=p.top_k, key_hex=p.request_id)]

    async def go():
        return await asyncio.gather(*(one(p) for p in prepared))
    return list(asyncio.run(go()))


def _reasons(verdicts) -> str:
    counts: dict[str, int] = defaultdict(int)
    for v in verdicts:
        counts[v.reason] += 1
    return ", ".join(f"{k} {c}" for k, c in sorted(counts.items(), key=lambda kv: -kv[1]))


def _empirical_batch(cheat, honest_parts, cal, batch_statistic, trials: int = 400) -> tuple[int | None, float]:
    """The smallest batch size b (answers drawn at random) for which >= 95% of cheat batches
    exceed the threshold, and the share of honest batches of size b that do (false alarms; a
    miner's batch comes from one honest configuration, so each part is drawn alone, worst kept)."""
    rng = random.Random(7)
    for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
        if b > len(cheat):
            break
        caught = sum(not batch_statistic(rng.sample(cheat, b), cal)[2] for _ in range(trials)) / trials
        if caught >= 0.95:
            fa = max(sum(not batch_statistic(rng.sample(part, min(b, len(part))), cal)[2] for _ in range(trials))
                     / trials for part in honest_parts)
            return b, fa
    return None, float("nan")


def _bench(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"BENCH {name} {value:.4g} {unit}" + (f"   # {note}" if note else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
