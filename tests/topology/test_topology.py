"""The separate-hosts fixture itself: hosts reach each other and nothing else, the machine cannot
reach them, links can be cut and ports blocked, and teardown leaves nothing, even after a failure
or a process that ignores SIGTERM."""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.topology import (IP, Host, Topology, _alive, _ip, _netns_list, cleanup_stale,
                                    missing_requirements)

pytestmark = [pytest.mark.topology,
              pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))]
PY = sys.executable


def _wait(check, timeout_s: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def serve(host: Host, port: int) -> subprocess.Popen:
    """A tiny HTTP server on ``host``'s address, listening when this returns."""
    proc = host.popen([PY, "-m", "http.server", "--bind", host.ip, str(port), "--directory", str(host.home)],
                      log=host.home / f"http-{port}.log")
    _wait(lambda: host.can_connect(host.ip, port, timeout_s=1), what=f"{host.name}:{port} to listen")
    return proc


def _machine_ips() -> list[str]:
    out = _ip("-4", "-o", "addr").stdout.split()
    return [w.split("/")[0] for i, w in enumerate(out) if i and out[i - 1] == "inet"]


def test_each_host_has_its_own_address_home_and_no_route_out(topology):
    assert list(topology.hosts) == ["validator", "miner1", "miner2", "user"]
    ips = [h.ip for h in topology.hosts.values()]
    assert len(set(ips)) == 4 and all(ipaddress.ip_address(ip) in topology.subnet for ip in ips)
    assert len({h.home for h in topology.hosts.values()}) == 4
    for host in topology.hosts.values():
        assert host.run(["sh", "-c", "echo $HOME"]).stdout.strip() == str(host.home)
        links = host.run([IP, "-o", "link"]).stdout
        assert [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()] == ["lo", "eth0"]
        routes = host.run([IP, "-4", "route", "show", "table", "all"]).stdout
        assert "default" not in routes, routes
        assert f"{topology.subnet} dev eth0" in routes
        for outside in ("192.0.2.1", "1.1.1.1", *[ip for ip in _machine_ips() if not ip.startswith("127.")]):
            got = host.run([IP, "route", "get", outside], check=False)
            assert got.returncode != 0 and "unreachable" in got.stderr, (outside, got.stdout)


def test_hosts_reach_each_other_over_the_bridge(topology):
    miner1 = topology["miner1"]
    server = serve(miner1, 8000)
    for name in ("validator", "miner2", "user"):
        assert topology[name].can_connect(miner1.ip, 8000)
    got = topology["user"].run([PY, "-c", f"import urllib.request as u; print(u.urlopen('http://{miner1.ip}:8000/').status)"])
    assert got.stdout.strip() == "200"
    assert f"{topology['user'].ip} - - " in (miner1.home / "http-8000.log").read_text()
    miner1.stop(server)
    assert server.poll() is not None and server not in miner1.procs
    assert not topology["user"].can_connect(miner1.ip, 8000, timeout_s=1)


def test_nothing_outside_the_topology_is_reachable_and_the_machine_cannot_reach_in(topology):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from the machine itself
        for host in topology.hosts.values():
            assert not host.can_connect("127.0.0.1", port, timeout_s=1)
            for ip in _machine_ips():
                assert not host.can_connect(ip, port, timeout_s=1)
    finally:
        listener.close()
    # The machine's namespace: no link, no route of the topology (only its own default route would
    # match the subnet, and that leads to the real gateway, which knows nothing of these hosts)
    assert f"rh{topology.tag}" not in _ip("-o", "link").stdout
    for line in _ip("-4", "-o", "route", "show", "table", "all").stdout.splitlines():
        first = line.split()[0]
        if first[0].isdigit():
            assert not ipaddress.ip_network(first, strict=False).overlaps(topology.subnet), line
    words = _ip("-4", "-o", "addr").stdout.split()
    assert not [w for i, w in enumerate(words) if words[i - 1] == "inet"
                and ipaddress.ip_interface(w).network.overlaps(topology.subnet)]


def test_cut_stops_all_traffic_and_restore_brings_it_back(topology):
    miner2, validator = topology["miner2"], topology["validator"]
    server = serve(miner2, 8001)
    back = serve(validator, 8001)
    assert validator.can_connect(miner2.ip, 8001)
    miner2.cut()
    try:
        assert not validator.can_connect(miner2.ip, 8001, timeout_s=1)
        assert not miner2.can_connect(validator.ip, 8001, timeout_s=1)
        assert topology["user"].can_connect(validator.ip, 8001)  # the others still talk
    finally:
        miner2.restore()
    _wait(lambda: validator.can_connect(miner2.ip, 8001, timeout_s=1), what="traffic after restore")
    assert miner2.can_connect(validator.ip, 8001)
    miner2.stop(server)
    validator.stop(back)


def test_block_inbound_drops_only_the_given_ports_and_sources(topology):
    miner1, user, validator = topology["miner1"], topology["user"], topology["validator"]
    servers = [serve(miner1, 8002), serve(miner1, 8003)]
    miner1.block_inbound([8002])
    assert not user.can_connect(miner1.ip, 8002, timeout_s=1)
    assert user.can_connect(miner1.ip, 8003)
    assert miner1.can_connect(miner1.ip, 8002)  # the host's own traffic to itself passes
    miner1.unblock_inbound()
    assert user.can_connect(miner1.ip, 8002)

    miner1.block_inbound(range(8002, 8004), from_ip=user.ip)
    assert not user.can_connect(miner1.ip, 8003, timeout_s=1)
    assert validator.can_connect(miner1.ip, 8002) and validator.can_connect(miner1.ip, 8003)
    miner1.unblock_inbound()
    miner1.unblock_inbound()  # a no-op the second time
    assert user.can_connect(miner1.ip, 8003)
    for s in servers:
        miner1.stop(s)


def test_a_second_topology_is_separate_and_tears_down_clean(topology, make_topology):
    other = make_topology(("a", "b"))
    assert other.tag != topology.tag and not other.subnet.overlaps(topology.subnet)
    server = serve(other["b"], 8000)
    assert other["a"].can_connect(other["b"].ip, 8000)
    assert not topology["validator"].can_connect(other["b"].ip, 8000, timeout_s=1)
    names = [f"rh{other.tag}-{n}" for n in ("a", "b", "br")]
    assert set(names) <= set(_netns_list())
    other.teardown()
    assert server.poll() is not None
    assert other.leftovers() == [] and not set(names) & set(_netns_list())
    other.teardown()  # idempotent
    assert set(f"rh{topology.tag}-{n}" for n in (*topology.hosts, "br")) <= set(_netns_list())


STUBBORN = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "if os.fork() == 0:\n"  # a daemon that leaves the session: only `ip netns pids` finds it
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        open(sys.argv[1] + '.daemon', 'w').write(str(os.getpid())); time.sleep(600)\n"
            "    os._exit(0)\n"
            "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)\n")


def test_teardown_after_a_failure_ends_stubborn_processes_and_leaves_nothing(tmp_path):
    topo = Topology(("x", "y"), root=tmp_path, stop_grace_s=1)
    with pytest.raises(RuntimeError, match="simulated"):
        with topo:
            topo["x"].popen([PY, "-c", STUBBORN, str(tmp_path / "x.pid")])
            _wait(lambda: (tmp_path / "x.pid.daemon").exists() and (tmp_path / "x.pid").exists(), what="pids")
            pids = [int((tmp_path / f).read_text()) for f in ("x.pid", "x.pid.daemon")]
            assert all(_alive(p) for p in pids)
            raise RuntimeError("simulated test failure")
    assert topo.leftovers() == []
    assert not [ns for ns in _netns_list() if ns.startswith(f"rh{topo.tag}-")]
    assert not [p for p in pids if _alive(p)]
    assert (tmp_path / "x").is_dir()  # a given root is kept, logs and all


def test_cleanup_stale_removes_a_crashed_run_and_spares_live_ones(topology):
    tag = secrets.token_hex(2)
    while any(ns.startswith(f"rh{tag}-") for ns in _netns_list()) or tag == topology.tag:
        tag = secrets.token_hex(2)
    ns = f"rh{tag}-crashed"
    _ip("netns", "add", ns)
    sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "600"], start_new_session=True)
    try:
        # (a test run alongside may clean it up first: that is cleanup_stale working too)
        _wait(lambda: sleeper.poll() is not None or str(sleeper.pid) in _ip("netns", "pids", ns, check=False).stdout,
              what="sleeper")
        cleanup_stale()
        assert ns not in _netns_list()
        assert sleeper.wait(5) == -signal.SIGTERM
        assert all(f"rh{topology.tag}-{n}" in _netns_list() for n in topology.hosts)  # live: spared
        assert topology["validator"].run(["true"]).returncode == 0
    finally:
        if sleeper.poll() is None:
            os.killpg(sleeper.pid, signal.SIGKILL)
            sleeper.wait()
        _ip("netns", "del", ns, check=False)


def test_build_and_teardown_finish_within_a_liveness_bound():
    started = time.monotonic()
    with Topology() as topo:
        built = time.monotonic() - started
    assert topo.leftovers() == []
    print(f"\nBUILD topology_build_s={built:.3f} teardown_s={topo.teardown_s:.3f}")
    assert built < 10 and topo.teardown_s < 10
