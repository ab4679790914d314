"""Margins and the batch statistic, calibrated on honest answers kept apart from the benchmark's.

Margin (per answer). An honest answer from other hardware or another dtype differs from the
verifier's own numbers by float noise: at a position where the model's top two choices are
closer than that noise, the honest token may not be the verifier's exact choice, and its *gap*
(how far its score lies below the verifier's choice, log-probability units, see ``verifier``) is
small but not zero. :func:`calibrate_margin` runs honest answers through every verifier
configuration that will judge (e.g. vLLM float32 and transformers bfloat16), takes the largest
gap seen, and returns ``factor`` times it (at least ``floor``; see the function for why it bisects).
The same margin then serves both dtypes. Positions whose top-2 gap is under the margin are
near-ties: a swap between those two tokens could pass, a blind spot the verdicts count
(``near_ties``) rather than hide.

Batch statistic (per batch of answers). A lower-precision copy of the model (weights rounded to
4 bits, say) mostly picks the same tokens, and where it differs the model's own choice is often
close enough to pass the per-answer margin. What gives it away is HOW OFTEN its tokens are not the
verifier's exact choice: :func:`batch_statistic` is the batch's mismatch rate (positions whose
claimed id is not the verifier's exact choice / positions checked), compared with a threshold
from honest calibration: a one-sided binomial bound ``p0 + z * sqrt(p0 (1 - p0) / n)`` over the
batch's ``n`` positions, ``p0`` the highest honest rate measured with that same verifier
configuration over the honest generator configurations (floored, since an fp32 verifier of fp32
answers sees almost none). :func:`batch_size_needed`
says how many answers a batch needs before a cheat with a given rate is caught with the wanted
power. Honest mismatches cluster on near-tie-rich prompts, so the binomial bound is an
approximation: the detection benchmark measures the false-alarm rate of honest batches too.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from pydantic import BaseModel

from cluster.verification.models import Claim, Verdict

DEFAULT_FACTOR = 2.0
# log-probability units. bfloat16 keeps 8 significant bits: a logit between 16 and 32 is rounded to
# a multiple of 0.125, so two honest roundings of the same pair can differ by 0.25 (gaps measured
# on honest bfloat16 answers: up to ~0.22). A small calibration set may not meet such a position.
DEFAULT_FLOOR = 0.25
DEFAULT_RATE_FLOOR = 0.002  # honest mismatch rate assumed at least (1 position in 500)
DEFAULT_Z = 4.0  # one-sided: an honest batch trips the threshold ~3e-5 of the time (if binomial)


class HonestSample(BaseModel):
    """What calibration measured with one verifier configuration on honest answers."""

    verifier: str
    answers: int
    positions: int
    max_gap: float  # the largest honest gap (log-probability units)
    mismatches: int  # honest positions whose token was not the verifier's exact choice
    near_ties_at_margin: int = 0  # filled in once the margin is known


class BatchCalibration(BaseModel):
    """The batch statistic's threshold for one verifier configuration."""

    verifier: str
    honest_rate: float  # p0 (floored)
    z: float = DEFAULT_Z

    def threshold(self, positions: int) -> float:
        p0 = self.honest_rate
        return p0 + self.z * math.sqrt(p0 * (1 - p0) / max(positions, 1))


MODEL_REASONS = ("ok", "not_argmax", "keyed_choice_mismatch", "ended_early")  # verdicts that measured a gap


def measure_honest(verifier, honest_claims: Sequence[Claim], margin: float = 0.0, *, scored=None
                   ) -> tuple[HonestSample, list[Verdict]]:
    """Judge honest claims at ``margin`` and measure their gaps (``scored``: the claims already
    scored by ``verifier.score``). Every one must reach the model: a byte-level refusal means the
    honest set is not honest, and calibration refuses it."""
    verdicts = verifier.judge(scored if scored is not None else verifier.score(list(honest_claims)), margin)
    bad = [v for v in verdicts if v.reason not in MODEL_REASONS]
    if bad:
        raise ValueError(f"{len(bad)} 'honest' claims are refused on their bytes ({bad[0].reason}: "
                         f"{bad[0].message}); calibration needs honest answers")
    return HonestSample(verifier=verifier.label, answers=len(verdicts),
                        positions=sum(v.checked_tokens for v in verdicts), max_gap=max(v.max_gap for v in verdicts),
                        mismatches=sum(v.mismatches for v in verdicts),
                        near_ties_at_margin=sum(v.near_ties for v in verdicts)), verdicts


def margin_from_gaps(max_gap: float, *, factor: float = DEFAULT_FACTOR, floor: float = DEFAULT_FLOOR) -> float:
    return max(floor, factor * max_gap)


def calibrate_margin(honest_claims: Sequence[Claim], verifiers: Iterable, *, factor: float = DEFAULT_FACTOR,
                     floor: float = DEFAULT_FLOOR, steps: int = 12) -> float:
    """One margin for every verifier configuration given: the smallest ``m >= floor`` (to ~2%)
    with ``factor * g(m) <= m``, ``g(m)`` the largest gap of any honest position judged at ``m``.

    Why not simply ``factor * g(0)``: the keyed check's tolerance at the candidate boundary is
    the margin itself (``verifier._keyed_position``). With no margin, a boundary token that float
    noise pushed into the verifier's top_k, with a lucky draw, makes an honest token look far
    from the choice (gaps of several units, measured); with a margin above the float noise those
    boundary tokens are unsettled and the honest gaps shrink to the noise itself. ``g`` only
    shrinks as ``m`` grows, so the condition is monotone and a bisection finds its edge. Claims
    are scored once; each step only re-judges."""
    verifiers = list(verifiers)
    if not verifiers:
        raise ValueError("calibrate_margin needs at least one verifier")
    scored = [(v, v.score(list(honest_claims))) for v in verifiers]

    def g(m: float) -> float:
        return max(measure_honest(v, honest_claims, m, scored=s)[0].max_gap for v, s in scored)

    lo = floor
    if factor * g(lo) <= lo:
        return lo
    hi = factor * g(lo)  # g(hi) <= g(lo): the condition holds at hi
    for _ in range(steps):
        if hi - lo <= 0.02 * hi:
            break
        mid = (lo + hi) / 2
        if factor * g(mid) <= mid:
            hi = mid
        else:
            lo = mid
    return hi


def calibrate_batch(samples: HonestSample | Sequence[HonestSample], *, rate_floor: float = DEFAULT_RATE_FLOOR,
                    z: float = DEFAULT_Z) -> BatchCalibration:
    """The batch threshold of one verifier configuration from its honest measurements. Give one
    sample per honest configuration (generator dtype / hardware): a miner's batch comes from one
    of them, so the bound uses the highest honest rate, not a pooled one (bfloat16 answers miss
    a float32 verifier's exact choice far more often than float32 ones)."""
    samples = [samples] if isinstance(samples, HonestSample) else list(samples)
    if not samples or len({s.verifier for s in samples}) != 1:
        raise ValueError("calibrate_batch needs samples of one verifier configuration")
    rate = max(s.mismatches / max(s.positions, 1) for s in samples)
    return BatchCalibration(verifier=samples[0].verifier, honest_rate=max(rate, rate_floor), z=z)


def batch_statistic(verdicts: Sequence[Verdict], calibration: BatchCalibration) -> tuple[float, float, bool]:
    """``(mismatch rate, threshold, ok)`` over the answers of a batch that reached the model
    (verdicts refused on their bytes carry no positions). ``ok`` False: the batch's tokens depart
    from the model's exact choices more often than honest hardware does: a lower-precision copy."""
    positions = sum(v.checked_tokens for v in verdicts)
    if positions == 0:
        return 0.0, calibration.threshold(0), True
    value = sum(v.mismatches for v in verdicts) / positions
    threshold = calibration.threshold(positions)
    return value, threshold, value <= threshold


def batch_size_needed(cheat_rate: float, tokens_per_answer: float, calibration: BatchCalibration, *,
                      power_z: float = 1.645, most: int = 100_000) -> int | None:
    """The fewest answers a batch needs so that a cheat whose tokens miss the exact choice at
    ``cheat_rate`` is caught with ~95% power (normal approximation); None if never (its rate is
    no higher than honest hardware's)."""
    p0 = calibration.honest_rate
    if cheat_rate <= p0:
        return None
    for m in range(1, most + 1):
        n = m * tokens_per_answer
        caught_below = cheat_rate - power_z * math.sqrt(cheat_rate * (1 - cheat_rate) / n)
        if caught_below > calibration.threshold(int(n)):
            return m
    return None
