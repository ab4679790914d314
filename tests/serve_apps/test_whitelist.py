"""The app whitelist and the weights digest: a non-whitelisted app and weights with a wrong
digest are refused with the reason."""

from __future__ import annotations

import json
import struct

import pytest

from cluster.resources import config_path
from cluster.errors import AppRefused, ConfigError
from cluster.protocol.whitelist import Whitelist, WhitelistEntry, weights_digest


def write_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]], *, metadata=None, reverse=False):
    """A real safetensors file, written by hand: header length, JSON header, data."""
    header, blob = {}, b""
    items = sorted(tensors.items(), reverse=reverse)
    for name, (dtype, shape, data) in items:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, sort_keys=reverse).encode()
    raw += b" " * (-len(raw) % 8)  # libraries pad differently: the digest must not care
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob)


TENSORS = {"layer.0.weight": ("F32", [2, 2], bytes(range(16))), "embed": ("BF16", [3], b"\x01\x02" * 3)}


def test_digest_ignores_file_layout_and_metadata_but_not_tensors(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_safetensors(a, TENSORS)
    write_safetensors(b, TENSORS, metadata={"format": "pt", "written_by": "another library"}, reverse=True)
    assert a.read_bytes() != b.read_bytes()
    assert weights_digest(a) == weights_digest(b)
    edited = dict(TENSORS, embed=("BF16", [3], b"\x01\x02\x01\x02\x01\x03"))
    write_safetensors(b, edited)
    assert weights_digest(a) != weights_digest(b)
    write_safetensors(b, dict(TENSORS, embed=("F16", [3], b"\x01\x02" * 3)))  # same bytes, other dtype
    assert weights_digest(a) != weights_digest(b)


def test_digest_of_a_sharded_folder_equals_the_single_file(tmp_path):
    single = tmp_path / "one.safetensors"
    write_safetensors(single, TENSORS)
    shards = tmp_path / "sharded"
    shards.mkdir()
    (name1, t1), (name2, t2) = TENSORS.items()
    write_safetensors(shards / "model-00001.safetensors", {name1: t1})
    write_safetensors(shards / "model-00002.safetensors", {name2: t2})
    assert weights_digest(shards) == weights_digest(single)


def test_whitelist_refusals_name_the_reason(tmp_path):
    weights = tmp_path / "w.safetensors"
    write_safetensors(weights, TENSORS)
    wl = Whitelist(apps=[WhitelistEntry(name="llm", version="2", app="serve_apps.echo:EchoApp",
                                        weights_sha256=weights_digest(weights))])
    assert wl.check("llm", "2", weights=weights).name == "llm"
    with pytest.raises(AppRefused) as err:
        wl.check("shady", "1")
    assert err.value.reason == "app_not_whitelisted" and "'shady' is not on the whitelist" in err.value.message
    with pytest.raises(AppRefused) as err:
        wl.check("llm", "3", weights=weights)
    assert err.value.reason == "app_not_whitelisted" and "pins '2'" in err.value.message
    write_safetensors(weights, dict(TENSORS, embed=("BF16", [3], b"\x00" * 6)))
    with pytest.raises(AppRefused) as err:
        wl.check("llm", "2", weights=weights)
    assert err.value.reason == "weights_digest_mismatch" and "llm 2 pins" in err.value.message


def test_the_shipped_whitelist_loads_and_a_malformed_one_is_named(tmp_path):
    assert Whitelist.load(config_path("serve_apps.toml")).check("echo", "1").app == "serve_apps.echo:EchoApp"
    bad = tmp_path / "apps.toml"
    bad.write_text('[apps.x]\nversion = "1"\napp = "not an import path"\n')
    with pytest.raises(ConfigError, match="apps.toml is malformed"):
        Whitelist.load(bad)
