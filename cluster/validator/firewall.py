"""Admitted-only membership at the network: which hosts may reach the public Ray head's ports.

The Ray token is handed to every admitted miner, and a token cannot be taken back; an address
can. validator-core keeps a host firewall on the validator's host that accepts the head's port
block (``ray_port_base`` .. +``PORT_BLOCK``: GCS, raylet, object manager, workers, metrics) only
from the addresses admitted miners joined from, and from loopback. Every change of membership
(a join, an expulsion, validator-core's start) re-applies the whole set in one transaction, so a
banned or deregistered miner's host loses its connections to the head at once, established
ones included.

    Firewall          the interface: ``sync(addresses)``, ``capabilities``
    NoFirewall        the one-machine dev stack (every member is on loopback)
    NftablesFirewall  a deployment (``firewall = "nftables"``; :mod:`.nftables`; chosen by the core)

What a firewall cannot do is said with :class:`FirewallFeature`, not by type checks.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable

from cluster.fabric.ports import PORT_BLOCK
from cluster.settings import ValidatorSettings


class FirewallFeature(enum.Enum):
    FILTERS = "filters"  # it actually keeps non-members out (NoFirewall does not)


class Firewall(ABC):
    features: frozenset[FirewallFeature] = frozenset()

    @abstractmethod
    def sync(self, addresses: Iterable[str]) -> None:
        """Let exactly ``addresses`` (and loopback) reach the protected ports from now on."""

    def close(self) -> None:
        """Nothing by default: the rules outlive validator-core (closed while it is down)."""


class NoFirewall(Firewall):
    def __init__(self) -> None:
        self.addresses: frozenset[str] = frozenset()

    def sync(self, addresses: Iterable[str]) -> None:
        self.addresses = frozenset(addresses)  # recorded, enforces nothing


def protected_ports(settings: ValidatorSettings) -> range:
    """The head's whole port block: everything its Ray processes listen on."""
    return range(settings.ray_port_base, settings.ray_port_base + PORT_BLOCK)
