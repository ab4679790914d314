"""Keyed Gumbel sampling, version 1: a sampled token that a verifier can recompute exactly.

Why: an ordinary sample cannot be checked (any token with non-zero probability is "valid"), so a
miner could return cheap or convenient text. Gumbel-max sampling with noise derived from a key
the miner does not choose (the request id = sha256 of the client-signed request envelope; a
miner that could vary the key could shop for convenient samples) makes every sampled token a
deterministic function of (model, prompt, key), so a verifier checks it like a greedy one: one
prefill pass, then this same function per position.
This definition is a wire-level contract between the LLM app and its verifiers; change it only
under a new version number.

Definition (version 1). Inputs: one row of next-token logits ``z`` over the vocabulary (token
ids 0..V-1), the key ``key_hex`` (64 lowercase hex digits: the request id), the output
position ``step`` (0 for the first generated token, 1 for the second, ...), the temperature
``T`` and ``top_k`` (1 <= k <= 20).

1. ``T == 0`` or ``k == 1``: the choice is ``argmax(z)``, the lowest token id among exact ties.
2. Candidates ``C``: the ``k`` token ids with the largest ``z``, ties broken by lower id.
3. Noise: ``d = sha256(bytes.fromhex(key_hex) || step as 8-byte little-endian unsigned)``;
   ``K = int.from_bytes(d[:16], "little")`` is the 128-bit key of a Philox4x64-10 generator
   (Random123) with key words ``(K mod 2**64, K >> 64)``; ``r`` is its output stream for the
   counters ``(1, 0, 0, 0), (2, 0, 0, 0), ...`` (4 words per block, in order), one 64-bit word
   per token id: exactly ``numpy.random.Philox(key=K).random_raw(V)``. ``u[i] = ((r[i] >> 11) + 0.5) / 2**53``
   (strictly inside (0, 1)) and ``g[i] = -log(-log(u[i]))`` (IEEE double).
4. The choice is ``argmax over i in C of (float64(z[i]) / T + g[i])``, lowest id among ties.

Properties a verifier relies on: noise depends on (key, step) only, never on the batch, the
other requests, the engine or the miner; adding a constant to a row changes nothing, so
log-probabilities can stand in for logits (vLLM's ``prompt_logprobs`` with k <= 20 covers the
candidates). Float differences between engines move scores by ~1e-5; a top-2 score gap below
the verifier's margin is a near-tie, a reported blind spot. Generating V words costs ~0.2 ms on
one core; production GPU batches can generate the same Philox stream on the device.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

GUMBEL_VERSION = 1
MAX_TOP_K = 20  # vLLM's logprobs cover at most the top 20: a vLLM verifier can recheck any choice
_KEY_HEX_LEN = 64


def philox_key(key_hex: str, step: int) -> int:
    """The 128-bit Philox key of (key, step): step 3 of the definition."""
    if len(key_hex) != _KEY_HEX_LEN or key_hex.lower() != key_hex:
        raise ValueError(f"key must be {_KEY_HEX_LEN} lowercase hex digits (a request id), got {key_hex!r}")
    if not 0 <= step < 2**63:
        raise ValueError(f"step must be a non-negative output position, got {step}")
    digest = hashlib.sha256(bytes.fromhex(key_hex) + step.to_bytes(8, "little")).digest()
    return int.from_bytes(digest[:16], "little")


def uniform_noise(key_hex: str, step: int, vocab_size: int) -> np.ndarray:
    """``u`` of the definition: one uniform in (0, 1) per token id, float64."""
    raw = np.random.Philox(key=philox_key(key_hex, step)).random_raw(vocab_size)
    return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)


def gumbel_noise(key_hex: str, step: int, vocab_size: int) -> np.ndarray:
    """``g`` of the definition over the whole vocabulary (for verifiers and tests)."""
    return -np.log(-np.log(uniform_noise(key_hex, step, vocab_size)))


def top_k_ids(row: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` ids with the largest values, ties broken by lower id, in increasing id order.
    O(V): a partition finds the k-th largest value; only exact ties at it need an order."""
    v = row.shape[0]
    if k >= v:
        return np.arange(v)
    kth = np.partition(row, v - k)[v - k]
    above = np.flatnonzero(row > kth)
    at = np.flatnonzero(row == kth)[: k - above.size]
    return np.sort(np.concatenate([above, at]))


def keyed_candidates(logits_row, key_hex: str, step: int, temperature: float,
                     top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The candidate ids and their scores ``z/T + g``, best first (ties: lower id first).

    A verifier uses the gap between the first two scores as the margin of a claimed choice."""
    row = _row(logits_row)
    _check(temperature, top_k)
    if temperature == 0 or top_k == 1:
        best = int(np.argmax(row))
        return np.array([best]), np.array([float(row[best])])
    cands = top_k_ids(row, top_k)
    raw = np.random.Philox(key=philox_key(key_hex, step)).random_raw(row.shape[0])[cands]
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)
    scores = row[cands].astype(np.float64) / float(temperature) - np.log(-np.log(u))
    order = np.lexsort((cands, -scores))  # by score descending, then by id ascending
    return cands[order], scores[order]


def keyed_choice(logits_row, key_hex: str | None, step: int, temperature: float, top_k: int) -> int:
    """The token id chosen at output position ``step`` (the definition in the module docstring)."""
    row = _row(logits_row)
    _check(temperature, top_k)
    if temperature == 0 or top_k == 1:
        return int(np.argmax(row))
    if key_hex is None:
        raise ValueError("a sampled (temperature > 0) choice needs a key")
    return int(keyed_candidates(row, key_hex, step, temperature, top_k)[0][0])


def keyed_choices(logits: np.ndarray, keys: Sequence[str | None], steps: Sequence[int],
                  temperatures: Sequence[float], top_ks: Sequence[int]) -> np.ndarray:
    """:func:`keyed_choice` for each row of a ``[n, V]`` batch (a verifier's or an engine's batch)."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or not len(keys) == len(steps) == len(temperatures) == len(top_ks) == logits.shape[0]:
        raise ValueError("keyed_choices needs a [n, V] array and n keys, steps, temperatures and top_ks")
    return np.array([keyed_choice(logits[i], keys[i], int(steps[i]), float(temperatures[i]), int(top_ks[i]))
                     for i in range(logits.shape[0])], dtype=np.int64)


def _row(logits_row) -> np.ndarray:
    if hasattr(logits_row, "detach"):  # a torch tensor: no torch import needed here
        logits_row = logits_row.detach().float().cpu().numpy()
    row = np.asarray(logits_row)
    if row.ndim != 1 or row.shape[0] == 0:
        raise ValueError(f"a logits row must be 1-D and non-empty, got shape {row.shape}")
    return row


def _check(temperature: float, top_k: int) -> None:
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
