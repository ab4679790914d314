"""Ports on this host: the block of explicit ports a Ray node takes, finding a free block, and
who listens where.

Several clusters (the validator's public one, its private verification one, every miner's
node) share one host, so no process may rely on a default port: each node takes a block of
``PORT_BLOCK`` consecutive ports from an explicit base (:class:`HeadPorts`), all on 127.0.0.1.
Bases are picked below the kernel's ephemeral range: a port there is never handed out to a
socket bound to port 0 or connecting out, so a block found free stays free until its node binds
it (a raylet otherwise fails with "address already in use").

Who listens where comes from psutil (a TCP socket in LISTEN state, v4 and v6).
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"
WORKER_PORT_COUNT = 50
PORT_BLOCK = 64  # ports one node takes from its base; space bases at least this far apart


@dataclass(frozen=True)
class HeadPorts:
    """Every port of a node, explicit, so several clusters can share a host.

    Worker nodes use the same layout (``HeadPorts.from_base(node_ports_base)``) and leave
    ``gcs``, ``dashboard`` and ``client_server`` unused.
    """

    gcs: int
    dashboard: int
    client_server: int
    dashboard_agent_grpc: int
    dashboard_agent_http: int
    metrics_export: int
    runtime_env_agent: int
    node_manager: int
    object_manager: int
    min_worker: int
    max_worker: int

    @classmethod
    def from_base(cls, base: int) -> "HeadPorts":
        """A consecutive block of ``PORT_BLOCK`` ports starting at ``base``."""
        if not 1024 <= base <= 65535 - PORT_BLOCK:
            raise ValueError(f"port base {base} out of range 1024-{65535 - PORT_BLOCK}: pick another base")
        return cls(*range(base, base + 9), base + 10, base + 10 + WORKER_PORT_COUNT - 1)

    @property
    def gcs_address(self) -> str:
        return f"{LOOPBACK}:{self.gcs}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard}"


def ephemeral_low(default: int = 32768) -> int:
    """The first port of the kernel's ephemeral range (Linux: ``ip_local_port_range``)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 right now."""
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
            return True
        except OSError:
            return False


def find_free_port_base(lo: int = 20000, hi: int | None = None, block: int = PORT_BLOCK) -> int:
    """A base whose whole block of ``block`` ports is free on 127.0.0.1 right now, below ``hi``
    (default: the start of the ephemeral range, see the module docstring)."""
    hi = hi or ephemeral_low()
    for _ in range(200):
        base = random.randrange(lo, hi - block)
        if all(port_free(p) for p in range(base, base + block)):
            return base
    raise RuntimeError(f"no free block of {block} ports in {lo}-{hi}: stop what holds them or pass a port base")


def _listeners(kind: str) -> list:
    return [c for c in psutil.net_connections(kind=kind) if c.status == psutil.CONN_LISTEN]


def listening_sockets(pids: set[int] | None = None) -> set[tuple[str, int]]:
    """Listening (ip, port) pairs on this host, of ``pids`` only when given."""
    return {(c.laddr.ip, c.laddr.port) for c in _listeners("inet") if pids is None or c.pid in pids}


def ports_listened_by(pids) -> set[int]:
    """TCP ports (v4 and v6) on which any of ``pids`` has a listening socket."""
    wanted = set(pids)
    return {c.laddr.port for c in _listeners("tcp") if c.pid in wanted}


def listening_ports(ports: set[int]) -> set[int]:
    """Which of ``ports`` have a listening TCP socket on this host right now (any process)."""
    return {c.laddr.port for c in _listeners("tcp") if c.laddr.port in ports}
