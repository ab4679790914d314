"""Settings, executor classes, the local chain and wallets: clear errors for bad files."""

import ipaddress
import json
import os
import re
import stat
from pathlib import Path

import click
import pytest
from bittensor_wallet import Keypair, Wallet

from cluster.chain import LocalChain
from cluster.protocol.identity import Hotkey, create_dev_wallet, load_wallet
from cluster.resources import config_path
from cluster.settings import MinerSettings, ValidatorSettings, load_executor_classes, load_settings
from cluster.errors import ConfigError


def test_sample_configs_load():
    v = load_settings(ValidatorSettings, config_path("validator.local.toml"), env_prefix="X_NONE_")
    assert v.port == 8750 and v.users
    m = load_settings(MinerSettings, config_path("miner.local.toml"), env_prefix="X_NONE_")
    assert m.executor_classes == {"always_on.test": 2}
    classes = load_executor_classes(config_path("executor_classes.toml"))
    assert {"always_on.test", "always_on.gpu-24gb", "spin_up-4min.gpu-24gb", "always_on.llm.a6000",
            "always_on.cpu.8c.16gb"} <= set(classes)
    mg = LocalChain(config_path("metagraph.local.json")).metagraph(12)
    assert [n.validator_permit for n in mg.neurons] == [True, False, False]


def test_environment_overrides_file(monkeypatch):
    monkeypatch.setenv("RAYHORDE_VALIDATOR_PORT", "9123")
    monkeypatch.setenv("RAYHORDE_VALIDATOR_USERS", '["a", "b"]')
    v = load_settings(ValidatorSettings, config_path("validator.local.toml"), env_prefix="RAYHORDE_VALIDATOR_")
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
        LocalChain(config_path("metagraph.local.json")).metagraph(13)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_wallet_in_bittensors_layout_loads_as_its_hotkey(tmp_path):
    """A hotkey written the way bittensor (btcli) writes it loads as that hotkey; nothing is written."""
    kp = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    Wallet(name="op", hotkey="hk1", path=str(tmp_path)).set_hotkey(kp, encrypt=False, overwrite=False)
    before = _files(tmp_path)
    hotkey = load_wallet(tmp_path, "op", "hk1")
    assert hotkey.ss58 == kp.ss58_address and "mnemonic" not in repr(hotkey)
    assert _files(tmp_path) == before


def test_a_missing_wallet_is_one_line_and_creates_nothing(tmp_path):
    for name, hotkey in (("nobody", "default"), ("op", "missing")):
        with pytest.raises(ConfigError) as err:
            load_wallet(tmp_path / "wallets", name, hotkey)
        assert "\n" not in str(err.value) and f"no hotkey file {tmp_path}/wallets/{name}/hotkeys/{hotkey}" in str(err.value)
        assert "btcli wallet new_hotkey" in str(err.value)
    assert _files(tmp_path) == []
    (tmp_path / "op" / "hotkeys").mkdir(parents=True)
    (tmp_path / "op" / "hotkeys" / "bad").write_text("{not a key")
    with pytest.raises(ConfigError, match="hotkey file .*bad is unreadable") as err:
        load_wallet(tmp_path, "op", "bad")
    assert "\n" not in str(err.value)


def test_a_role_with_a_missing_wallet_exits_with_one_line(tmp_path):
    """validator-core and the miner agent refuse to start without their wallet, in one line, and
    write no wallet (production roles never derive or create keys)."""
    import subprocess
    import sys
    for module in ("cluster.validator.main", "cluster.miner.main"):
        out = subprocess.run([sys.executable, "-m", module, "--wallet.path", str(tmp_path / "w"), "--wallet.name",
                              "op", "--wallet.hotkey", "hk"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "RAYHORDE_MINER_VALIDATOR_HOTKEY": "x", "RAYHORDE_HOME": str(tmp_path)})
        assert out.returncode != 0
        assert out.stderr.strip().splitlines()[-1].endswith(
            f"no hotkey file {tmp_path}/w/op/hotkeys/hk; create one with `btcli wallet new_hotkey --wallet.name op "
            f"--wallet.hotkey hk --wallet.path {tmp_path}/w`, or point --wallet.name / --wallet.hotkey / "
            "--wallet.path at yours"), (module, out.stderr)
        assert not (tmp_path / "w").exists()


def test_dev_wallets_are_written_once_in_bittensors_layout(tmp_path):
    first = create_dev_wallet(tmp_path, "miner1", "//Bob")
    assert first.ss58 == Hotkey.from_uri("//Bob").ss58
    file = tmp_path / "miner1" / "hotkeys" / "default"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert create_dev_wallet(tmp_path, "miner1", "//Charlie").ss58 == first.ss58  # never overwritten
    assert load_wallet(tmp_path, "miner1").ss58 == first.ss58


def test_relative_paths_follow_the_config_file_not_the_checkout(tmp_path, monkeypatch):
    """A config folder moves as a whole: its relative paths name files beside it; relative paths
    from the environment are relative to the current directory; defaults are the shipped files."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "classes.toml").write_text(config_path("executor_classes.toml").read_text())
    (folder / "v.toml").write_text('executor_classes_path = "classes.toml"\nmetagraph_path = "sub/mg.json"\n')
    monkeypatch.chdir(tmp_path)
    v = load_settings(ValidatorSettings, folder / "v.toml", env_prefix="X_NONE_")
    assert v.executor_classes_path == folder / "classes.toml" and "always_on.test" in load_executor_classes(
        v.executor_classes_path)
    assert v.metagraph_path == folder / "sub" / "mg.json"
    assert v.whitelist_path == config_path("serve_apps.toml")  # not set: the shipped default
    monkeypatch.setenv("X_WHITELIST_PATH", "mine/apps.toml")
    v = load_settings(ValidatorSettings, folder / "v.toml", env_prefix="X_")
    assert v.whitelist_path == tmp_path / "mine" / "apps.toml"


def test_unknown_shipped_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="ships no config 'nope.toml'; shipped: .*validator.local.toml"):
        config_path("nope.toml")


def test_a_verifier_factory_named_before_the_move_still_resolves(tmp_path):
    cfg = tmp_path / "v.toml"
    cfg.write_text('verifier_factory = "cluster._private.verification.verifier:Verifier"\n')
    v = load_settings(ValidatorSettings, cfg, env_prefix="X_NONE_")
    assert v.verifier_factory == "cluster.verification.verifier:Verifier"


# --- deployment samples: configs/*.prod.toml, examples/deploy/, the README's commands ---------

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "examples" / "deploy"


def test_production_samples_load_with_fixed_public_addresses():
    """The production samples load as they are (no field the models refuse), and a miner built
    from them advertises a routable Ray node on fixed ports, which `miner check` requires."""
    v = load_settings(ValidatorSettings, config_path("validator.prod.toml"), env_prefix="X_NONE_")
    assert v.url.startswith("https://") and v.tls_key_path and v.ca_bundle_path
    assert not ipaddress.ip_address(v.ray_node_ip).is_loopback and v.gcs_address() == f"{v.ray_node_ip}:6380"
    assert v.resolved_db_url().startswith("postgresql+psycopg://") and str(v.home).startswith("/var/lib/rayhorde/")
    assert v.dashboard_url().startswith("http://127.0.0.1:")  # the Jobs API stays on loopback
    m = load_settings(MinerSettings, config_path("miner.prod.toml"), env_prefix="X_NONE_")
    assert m.node_port_base != 0 and m.node_port_base != v.ray_port_base
    assert not ipaddress.ip_address(m.ray_node_ip).is_loopback
    assert m.proxy_url.startswith("https://") and m.validator_url == v.url and m.tls_key_path and m.ca_bundle_path
    assert m.docker_host.startswith("unix://") and not m.allow_private_networks
    assert str(m.home).startswith("/var/lib/rayhorde/")


def _resolve(words: list[str]) -> str | None:
    """Why ``rayhorde <words>`` is not a command of the CLI with those options, or None if it is."""
    from cluster.cli.main import main

    cmd, path = main, ["rayhorde"]
    for word in words:
        if isinstance(cmd, click.Group):
            sub = cmd.get_command(click.Context(cmd), word)
            if sub is None:
                return f"`{' '.join(path)}` has no command {word!r}"
            cmd, path = sub, path + [word]
            continue
        if word == "--":
            break
        if word.startswith("--"):
            opts = {o for p in cmd.params for o in p.opts} | {"--help"}
            if word.split("=")[0] not in opts:
                return f"`{' '.join(path)}` has no option {word.split('=')[0]} (it has {sorted(opts)})"
    return f"`{' '.join(path)}` needs a subcommand" if isinstance(cmd, click.Group) else None


_SHELL_END = re.compile(r"\s(?:#|&&|\|\|?|;|>)\s?|[`)]")


def _commands_in(markdown: str) -> list[list[str]]:
    """Every `rayhorde ...` invocation shown in the text: lines of bash blocks, and inline code."""
    found, in_bash = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash" and not in_bash
            continue
        spans = [line] if in_bash else re.findall(r"`([^`]+)`", line)
        for span in spans:
            # in command position: first on the line, or after $( && ; |; bare or a venv's bin/rayhorde
            for m in re.finditer(r"(?:^|\$\(|&&|;|\|)\s*(?:[\w./-]*bin/)?rayhorde( [^\n]*)", span):
                rest = _SHELL_END.split(m.group(1), maxsplit=1)[0]
                words = [w for w in rest.split() if not w.startswith(("<", "$", "'", '"'))]
                if words:
                    found.append(words)
    return found


def test_the_systemd_units_run_the_role_commands():
    """Each unit starts its role's command with the config path the install steps use, and the
    command exists in the CLI."""
    for unit, role in (("rayhorde-validator.service", "validator"), ("rayhorde-miner.service", "miner")):
        text = (DEPLOY / unit).read_text()
        exec_start = [line.split("=", 1)[1].split() for line in text.splitlines() if line.startswith("ExecStart=")]
        assert len(exec_start) == 1, unit
        argv = exec_start[0]
        assert argv[0].endswith("/rayhorde") and argv[1:] == [role, "run", "--config", f"/etc/rayhorde/{role}.toml"]
        assert _resolve(argv[1:]) is None, _resolve(argv[1:])
        for setting in ("Restart=on-failure", "KillMode=mixed", "WorkingDirectory=/var/lib/rayhorde",
                        "NoNewPrivileges=yes"):
            assert setting in text.splitlines(), (unit, setting)
        assert re.search(r"^TimeoutStopSec=\d+$", text, re.M), unit
    # the agent's job tmpfs mounts must stay visible to the container engine: no mount namespace
    miner = (DEPLOY / "rayhorde-miner.service").read_text()
    assert not re.search(r"^(ProtectSystem|ReadWritePaths|ProtectHome|PrivateTmp)=", miner, re.M)


def test_every_rayhorde_command_in_the_deploy_docs_exists():
    """The deploy guide and the README show only commands (and options) the CLI has."""
    for doc in (DEPLOY / "README.md", REPO / "README.md"):
        commands = _commands_in(doc.read_text())
        assert commands, doc
        bad = [f"rayhorde {' '.join(words)}: {why}" for words in commands if (why := _resolve(words))]
        assert bad == [], doc
    shown = {" ".join(w[:2]) for w in _commands_in((DEPLOY / "README.md").read_text())}
    assert {"miner check", "miner run", "validator run"} <= shown


def test_the_command_check_catches_a_wrong_command():
    assert _resolve(["miner", "check", "--config", "x"]) is None
    assert "no command 'start'" in _resolve(["miner", "start"])
    assert "no option --wallet" in _resolve(["validator", "run", "--wallet", "x"])
    assert "needs a subcommand" in _resolve(["miner"])
    assert _commands_in("```bash\nrayhorde miner check --config f  # x\nuseradd --home-dir /var/lib/rayhorde --x\n"
                        "CAP=$(.venv/bin/rayhorde capability --max-jobs 5)\n```\nthen `rayhorde up`, as rayhorde does.\n"
                        ) == [["miner", "check", "--config", "f"], ["capability", "--max-jobs", "5"], ["up"]]
