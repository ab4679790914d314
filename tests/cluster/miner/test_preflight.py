"""``rayhorde miner check`` against a real validator-core served over HTTPS on 127.0.0.1: every
check named, each failure with its cause, exit 1 when any fails. (That validator-core cannot
reach a miner host's Ray ports through a firewall is shown on the multi-host topology:
tests/topology/test_across_hosts.py.)"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cluster.chain.local import LocalChain
from cluster.cli.main import main as cli
from cluster.devstack.certs import make_ca
from cluster.fabric.ports import PORT_BLOCK, find_free_port_base
from cluster.miner.preflight import run_checks
from cluster.miner.serving import BackgroundServer
from cluster.protocol.canonical import NS
from cluster.protocol.identity import Hotkey, create_dev_wallet
from cluster.resources import config_path
from cluster.settings import MinerSettings, ValidatorSettings
from cluster.validator.app import build_app
from cluster.validator.core import ValidatorCore
from tests.support.net import free_port

ALICE = Hotkey.from_uri("//Alice")
SKEW_S = 60



class _Validator:
    def __init__(self, root: Path, *, skew_s: float = 0) -> None:
        ca = make_ca(root / "ca")
        cert, key = ca.issue(root / "tls", "validator", ["127.0.0.1"])
        self.ca_path = ca.cert_path
        shutil.copy(config_path("metagraph.local.json"), root / "metagraph.json")
        settings = ValidatorSettings(home=root, wallet_path=root, db_url=f"sqlite:///{root / 'v.db'}",
                                     metagraph_path=root / "metagraph.json", deploy_streams=False)
        core = ValidatorCore(settings, hotkey=ALICE, chain=LocalChain(settings.metagraph_path), ray_token="t",
                             clock=lambda: time.time_ns() + int(skew_s * NS))
        port = free_port()
        self.server = BackgroundServer(build_app(core), name="validator-core under test", host="127.0.0.1",
                                       port=port, ssl_certfile=cert, ssl_keyfile=key)
        self.server.start()
        self.url = f"https://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def validator(tmp_path_factory):
    v = _Validator(tmp_path_factory.mktemp("validator"))
    yield v
    v.server.stop()


def _settings(v: _Validator, tmp: Path, uri: str = "//Bob", **over) -> MinerSettings:
    create_dev_wallet(tmp / "wallets", "miner", uri)
    values = dict(home=tmp / "home", wallet_path=tmp / "wallets", wallet_name="miner", validator_url=v.url,
                  validator_hotkey=ALICE.ss58, ca_bundle_path=v.ca_path,
                  node_port_base=find_free_port_base(block=PORT_BLOCK))
    values.update(over)
    return MinerSettings(**values)


def _by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_a_ready_miner_host_passes_every_check(validator, tmp_path, engine):
    checks = _by_name(run_checks(_settings(validator, tmp_path)))
    assert list(checks) == ["wallet", "container engine", "GPU toolkit", "validator", "clock", "registration",
                            "Ray ports", "proxy port"]
    assert all(c.ok for c in checks.values()), [c.line() for c in checks.values()]
    assert "not needed" in checks["GPU toolkit"].detail


def test_each_failure_is_named_and_the_others_still_run(validator, tmp_path):
    s = _settings(validator, tmp_path, uri="//Eve", docker_host="unix:///nonexistent/docker.sock")
    checks = _by_name(run_checks(s))
    assert not checks["container engine"].ok and "/nonexistent/docker.sock" in checks["container engine"].detail
    assert not checks["registration"].ok and "not registered" in checks["registration"].detail
    assert checks["wallet"].ok and checks["validator"].ok and checks["Ray ports"].ok


def test_a_missing_wallet_or_the_wrong_validator_is_named(validator, tmp_path):
    s = _settings(validator, tmp_path, wallet_name="nobody")
    checks = _by_name(run_checks(s))
    assert not checks["wallet"].ok and "nobody" in checks["wallet"].detail
    assert not checks["registration"].ok and "no hotkey" in checks["registration"].detail
    wrong = _by_name(run_checks(_settings(validator, tmp_path, validator_hotkey=Hotkey.from_uri("//Ferdie").ss58)))
    assert not wrong["validator"].ok and "not validator_hotkey" in wrong["validator"].detail


def test_ports_can_only_be_checked_on_the_requesting_address(validator, tmp_path):
    checks = _by_name(run_checks(_settings(validator, tmp_path, ray_node_ip="127.0.0.2")))
    assert not checks["Ray ports"].ok and "address_mismatch" in checks["Ray ports"].detail, checks["Ray ports"]


def test_another_ca_is_refused_by_name(validator, tmp_path):
    other = make_ca(tmp_path / "other", "someone else's CA")
    checks = _by_name(run_checks(_settings(validator, tmp_path, ca_bundle_path=other.cert_path)))
    assert not checks["validator"].ok and "not trusted" in checks["validator"].detail


def test_a_skewed_clock_is_named(tmp_path):
    v = _Validator(tmp_path / "skewed", skew_s=SKEW_S)
    try:
        checks = _by_name(run_checks(_settings(v, tmp_path)))
    finally:
        v.server.stop()
    clock = checks["clock"]
    assert not clock.ok and "behind validator-core (allowed 5 s)" in clock.detail and "sync" in clock.detail
    assert abs(float(clock.detail.split()[3]) - SKEW_S) < 5, clock.detail


def test_the_command_exits_1_and_names_the_failed_check(validator, tmp_path):
    s = _settings(validator, tmp_path, uri="//Eve")
    config = tmp_path / "miner.toml"
    config.write_text("\n".join(f'{k} = "{v}"' if not isinstance(v, int) else f"{k} = {v}" for k, v in {
        "wallet_path": str(s.wallet_path), "wallet_name": "miner", "validator_url": s.validator_url,
        "validator_hotkey": s.validator_hotkey, "ca_bundle_path": str(s.ca_bundle_path),
        "node_port_base": s.node_port_base}.items()) + "\n")
    out = CliRunner().invoke(cli, ["miner", "check", "--config", str(config)])
    assert out.exit_code == 1, out.output
    assert "FAIL  registration:" in out.output and "failed: registration" in out.output.splitlines()[-1]
