"""Settings, executor classes, the local chain and wallets: clear errors for bad files."""

import json
import stat

import pytest

from cluster.chain import LocalChain
from cluster.protocol.identity import load_or_create_wallet
from cluster.settings import REPO_ROOT, MinerSettings, ValidatorSettings, load_executor_classes, load_settings
from cluster.errors import ConfigError


def test_sample_configs_load():
    v = load_settings(ValidatorSettings, REPO_ROOT / "configs/validator.local.toml", env_prefix="X_NONE_")
    assert v.port == 8750 and v.users
    m = load_settings(MinerSettings, REPO_ROOT / "configs/miner.local.toml", env_prefix="X_NONE_")
    assert m.executor_classes == {"always_on.test": 2}
    classes = load_executor_classes(REPO_ROOT / "configs/executor_classes.toml")
    assert {"always_on.test", "always_on.gpu-24gb", "spin_up-4min.gpu-24gb", "always_on.llm.a6000",
            "always_on.cpu.8c.16gb"} <= set(classes)
    mg = LocalChain(REPO_ROOT / "configs/metagraph.local.json").metagraph(12)
    assert [n.validator_permit for n in mg.neurons] == [True, False, False]


def test_environment_overrides_file(monkeypatch):
    monkeypatch.setenv("RAYHORDE_VALIDATOR_PORT", "9123")
    monkeypatch.setenv("RAYHORDE_VALIDATOR_USERS", '["a", "b"]')
    v = load_settings(ValidatorSettings, REPO_ROOT / "configs/validator.local.toml", env_prefix="RAYHORDE_VALIDATOR_")
    assert v.port == 9123 and v.users == ["a", "b"]


def test_malformed_settings_file_names_the_file(tmp_path):
    bad = tmp_path / "v.toml"
    bad.write_text("port = [")
    with pytest.raises(ConfigError, match="v.toml is not valid TOML"):
        load_settings(ValidatorSettings, bad, env_prefix="X_NONE_")
    bad.write_text('port = "not a number"')
    with pytest.raises(ConfigError, match="invalid ValidatorSettings"):
        load_settings(ValidatorSettings, bad, env_prefix="X_NONE_")


def test_malformed_metagraph_is_a_clear_error(tmp_path):
    path = tmp_path / "mg.json"
    path.write_text(json.dumps({"netuid": 12, "neurons": [{"uid": 0, "hotkey": "not-ss58"}]}))
    with pytest.raises(ConfigError, match="invalid SS58 hotkeys"):
        LocalChain(path).metagraph(12)
    with pytest.raises(ConfigError, match="is for netuid 12, not 13"):
        LocalChain(REPO_ROOT / "configs/metagraph.local.json").metagraph(13)


def test_wallet_created_once_with_private_permissions(tmp_path):
    first = load_or_create_wallet(tmp_path, "m")
    again = load_or_create_wallet(tmp_path, "m")
    assert first.ss58 == again.ss58
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o600
    assert "mnemonic" not in repr(first)
    (tmp_path / "m.json").write_text("{")
    with pytest.raises(ConfigError, match="unreadable"):
        load_or_create_wallet(tmp_path, "m")
