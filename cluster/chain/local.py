"""A file-backed chain: the metagraph is a JSON file (``configs/metagraph.local.json``), weights a
JSON-lines log beside validator-core's data.

The metagraph is re-read on every call so an operator can register or deregister a hotkey by
editing the file. Weights are appended, one line per ``set_weights`` call, under an exclusive
``flock`` and fsync'ed: a crash leaves the log with every earlier line intact (a torn last line
is skipped by :meth:`LocalChain.weights`). Like the real chain, weights for a uid that is not in
the metagraph or outside 0..65535 are refused as a whole.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ValidationError

from cluster.chain.base import U16_MAX, ChainBackend, ChainFeature, Metagraph
from cluster.protocol.identity import is_ss58
from cluster.errors import ChainError, ConfigError


class WeightsSet(BaseModel):
    """One line of the local weights log."""

    netuid: int
    block: int  # the metagraph's block when they were set
    setter: str  # the validator hotkey (SS58)
    t_ns: int
    weights: dict[int, int]  # uid -> u16


class LocalChain(ChainBackend):
    def __init__(self, path: str | Path, *, weights_path: str | Path | None = None, setter: str | None = None) -> None:
        """``weights_path`` and ``setter`` (the validator's SS58 hotkey) enable :meth:`set_weights`."""
        self.path = Path(path)
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.setter = setter
        self.features = ChainFeature.READ_METAGRAPH
        if self.weights_path is not None and setter is not None:
            self.features |= ChainFeature.SET_WEIGHTS

    def metagraph(self, netuid: int) -> Metagraph:
        try:
            mg = Metagraph.model_validate(json.loads(self.path.read_text()))
        except FileNotFoundError as exc:
            raise ConfigError(f"metagraph file {self.path} does not exist") from exc
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"metagraph file {self.path} is malformed: {exc}") from exc
        if mg.netuid != netuid:
            raise ConfigError(f"metagraph file {self.path} is for netuid {mg.netuid}, not {netuid}")
        bad = [n.hotkey for n in mg.neurons if not is_ss58(n.hotkey)]
        if bad:
            raise ConfigError(f"metagraph file {self.path} has invalid SS58 hotkeys: {bad}")
        return mg

    def set_weights(self, netuid: int, weights: dict[int, int]) -> str:
        if self.weights_path is None or self.setter is None:
            return super().set_weights(netuid, weights)
        mg = self.metagraph(netuid)
        uids = {n.uid for n in mg.neurons}
        unknown = sorted(set(weights) - uids)
        if unknown:
            raise ChainError(f"weights for uids {unknown} refused: not in subnet {netuid}'s metagraph (block {mg.block}); "
                             "score only registered hotkeys")
        bad = {u: w for u, w in weights.items() if not 0 <= w <= U16_MAX}
        if bad:
            raise ChainError(f"weights {bad} refused: each must be 0..{U16_MAX} (u16-normalised)")
        line = WeightsSet(netuid=netuid, block=mg.block, setter=self.setter, t_ns=time.time_ns(),
                          weights=dict(sorted(weights.items()))).model_dump_json() + "\n"
        self.weights_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.weights_path, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one line per call even with several validators on one file
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return f"{self.weights_path}:{self.weights_path.stat().st_size}"

    def weights(self, netuid: int) -> dict[str, WeightsSet]:
        """The latest weights each validator set on ``netuid`` (empty before any)."""
        latest: dict[str, WeightsSet] = {}
        if self.weights_path is None or not self.weights_path.exists():
            return latest
        for raw in self.weights_path.read_text(encoding="utf-8").splitlines():
            try:
                ws = WeightsSet.model_validate_json(raw)
            except ValidationError:
                continue  # a line torn by a crash mid-write
            if ws.netuid == netuid:
                latest[ws.setter] = ws
        return latest
