"""The admitted-only firewall on real hosts (network namespaces): validator-core's nftables
rules let only admitted addresses reach the head's Ray port block, and taking an address out cuts
its connections at once, established ones included; other ports are untouched."""

from __future__ import annotations

import sys
import time

import pytest

from tests.support.topology import Host

pytestmark = [pytest.mark.topology, pytest.mark.integration]
PY = sys.executable
BLOCK = range(31000, 31064)
ECHO = """
import socket, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(({ip!r}, {port})); srv.listen()
def echo(c):
    while (data := c.recv(100)):
        c.sendall(data)
while True:
    threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
"""
HOLD = """
import os, socket, sys, time
c = socket.create_connection(({ip!r}, {port}), timeout=3)
c.sendall(b"a"); assert c.recv(10) == b"a"
print("connected", flush=True)
while not os.path.exists({flag!r}):
    time.sleep(0.05)
c.settimeout(3)
try:
    c.sendall(b"b"); print("echoed" if c.recv(10) == b"b" else "closed", flush=True)
except OSError as exc:
    print("cut", type(exc).__name__, flush=True)
"""


def sync(v: Host, *addresses: str) -> None:
    code = ("import sys; from cluster.validator.nftables import NftablesFirewall; "
            f"NftablesFirewall(range({BLOCK.start}, {BLOCK.stop})).sync(sys.argv[1:])")
    v.run([PY, "-c", code, *addresses], timeout_s=60)


def listen(v: Host, port: int) -> None:
    v.popen([PY, "-c", ECHO.format(ip=v.ip, port=port)], log=v.home / f"echo-{port}.log")
    deadline = time.monotonic() + 10
    while not v.can_connect(v.ip, port, timeout_s=1):
        assert time.monotonic() < deadline, f"echo server on {port} did not listen"


def test_only_admitted_addresses_reach_the_ray_ports_and_removal_cuts_them_at_once(make_topology, tmp_path):
    topo = make_topology(("validator", "miner1", "stranger"))
    v, m, s = topo["validator"], topo["miner1"], topo["stranger"]
    for port in (BLOCK.start, BLOCK.stop - 1, 8750):  # the GCS, the last worker port, validator-core's door
        listen(v, port)
    assert s.can_connect(v.ip, BLOCK.start)  # before: anyone (what a deployment without it looks like)

    sync(v, m.ip)
    assert m.can_connect(v.ip, BLOCK.start) and m.can_connect(v.ip, BLOCK.stop - 1)
    assert not s.can_connect(v.ip, BLOCK.start) and not s.can_connect(v.ip, BLOCK.stop - 1)
    assert s.can_connect(v.ip, 8750)  # validator-core's own port stays open: admission goes through it
    assert v.can_connect(v.ip, BLOCK.start)  # the host itself (loopback) is never blocked

    flag = tmp_path / "now"
    held = m.popen([PY, "-c", HOLD.format(ip=v.ip, port=BLOCK.start, flag=str(flag))], log=m.home / "hold.log")
    deadline = time.monotonic() + 10
    while "connected" not in (m.home / "hold.log").read_text():
        assert held.poll() is None and time.monotonic() < deadline, (m.home / "hold.log").read_text()
        time.sleep(0.1)
    sync(v)  # the miner is expelled: nobody but loopback now
    flag.touch()
    held.wait(15)
    said = (m.home / "hold.log").read_text()
    assert said.splitlines()[-1].startswith("cut "), said  # the open connection died with the address
    assert not m.can_connect(v.ip, BLOCK.start)
    sync(v, m.ip, s.ip)  # re-admitted (a fresh join), and another one
    assert m.can_connect(v.ip, BLOCK.start) and s.can_connect(v.ip, BLOCK.start)
