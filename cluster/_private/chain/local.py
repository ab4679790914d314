"""A file-backed chain: the metagraph is a JSON file (``configs/metagraph.local.json``).

Re-read on every call so an operator can register or deregister a hotkey by editing the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from cluster._private.chain.base import ChainBackend, ChainFeature, Metagraph
from cluster._private.identity import is_ss58
from cluster.errors import ConfigError


class LocalChain(ChainBackend):
    features = ChainFeature.READ_METAGRAPH

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

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
