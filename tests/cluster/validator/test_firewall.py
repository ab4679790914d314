"""The admitted-only firewall's rules, as text (the behaviour on real hosts is in
``tests/topology/test_firewall.py``)."""

from __future__ import annotations

import shutil

import pytest

from cluster.errors import ConfigError
from cluster.settings import ValidatorSettings
from cluster.validator.core import ValidatorCore
from cluster.validator.firewall import FirewallFeature, NoFirewall, protected_ports
from cluster.validator.nftables import NftablesFirewall


def test_the_rules_admit_exactly_the_given_addresses_to_the_heads_port_block(tmp_path):
    fw = NftablesFirewall(range(31000, 31064), nft="/usr/sbin/nft")
    script = fw.script(["10.9.0.3", "10.9.0.2", "::ffff:10.9.0.4", "fd00::7", "10.9.0.2"])
    assert "elements = { 10.9.0.2, 10.9.0.3, 10.9.0.4 };" in script  # sorted, once, v4-mapped as v4
    assert "elements = { fd00::7 };" in script
    assert "tcp dport 31000-31063 drop" in script and 'iifname "lo" accept' in script
    assert script.index("delete table inet rayhorde") < script.index("set admitted4")  # rebuilt whole
    empty = fw.script([])
    assert "elements" not in empty and "tcp dport 31000-31063 drop" in empty  # nobody but loopback


@pytest.mark.parametrize("bad", ["10.9.0.2; flush ruleset", "host.example", "10.9.0.256", ""])
def test_anything_but_an_address_is_refused_before_nft_sees_it(bad):
    with pytest.raises(ValueError):
        NftablesFirewall(range(31000, 31064), nft="/usr/sbin/nft").script([bad])


def test_the_setting_picks_the_firewall(tmp_path, monkeypatch):
    settings = ValidatorSettings(home=tmp_path, wallet_path=tmp_path, ray_port_base=31000)
    assert isinstance(ValidatorCore._firewall(settings), NoFirewall)
    assert FirewallFeature.FILTERS not in ValidatorCore._firewall(settings).features
    assert protected_ports(settings) == range(31000, 31064)
    nft = settings.model_copy(update={"firewall": "nftables"})
    if shutil.which("nft"):
        assert FirewallFeature.FILTERS in ValidatorCore._firewall(nft).features
    monkeypatch.setenv("PATH", str(tmp_path))  # no nft on PATH
    with pytest.raises(ConfigError, match="nft command is not installed: apt install nftables"):
        ValidatorCore._firewall(nft)
