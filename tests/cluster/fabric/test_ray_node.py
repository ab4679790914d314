"""Integration test of cluster.fabric.ray_node: a head and two worker nodes on loopback.

Why (Ray 2.60.0):
* Ports come from a random free block below 32768 (Linux' ephemeral range starts there, so
  Ray's own outgoing connections can't take them); every port of every node is explicit.
* The temp dir is /tmp/rh-<random>: unix socket paths are limited to 107 bytes.
* The driver runs in a subprocess with ``ray_env(token)``: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
  is read when ``ray`` is imported (already done here), and the driver must hold the token.
  It stays connected until its stdin closes, so its workers are alive for the listener check.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from cluster.fabric import ray_node as rn
from cluster.fabric.ports import PORT_BLOCK, HeadPorts, find_free_port_base

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]
LOOPBACK_ADDRS = {"127.0.0.1", "::ffff:127.0.0.1"}  # Ray's gRPC servers use v4-mapped sockets
WORKERS = {"A": {"miner:A": 1, "always_on.test": 2}, "B": {"miner:B": 1, "always_on.test": 2}}
DRIVER = r"""
import json, os, sys, time, ray
t0 = time.monotonic()
ray.init(address=sys.argv[1], log_to_driver=False)
t1 = time.monotonic()
@ray.remote(num_cpus=0, max_retries=0, resources={"miner:B": 0.001, "always_on.test": 1})
def where():
    return {"node_id": ray.get_runtime_context().get_node_id(), "cwd": os.getcwd(),
            "cwd_entries": sorted(os.listdir(".")), "canary": "RH_TEST_CANARY" in os.environ}
out = ray.get(where.remote(), timeout=60)
out.update(init_s=t1 - t0, first_task_s=time.monotonic() - t1)
print(json.dumps(out), flush=True)
sys.stdin.read()  # stay connected until the test closes stdin
ray.shutdown()
"""


class LocalCluster:
    def __init__(self):
        self.token = os.urandom(24).hex()
        self.root = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
        base = find_free_port_base(hi=32768, block=PORT_BLOCK * (1 + len(WORKERS)))
        self.ports = HeadPorts.from_base(base)
        self.worker_bases = {n: base + (i + 1) * PORT_BLOCK for i, n in enumerate(WORKERS)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}
        self.cwds: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.driver_result: dict | None = None

    def start(self) -> None:
        os.environ["RH_TEST_CANARY"] = "secret"  # must not reach Ray processes (ray_env allow-list)
        try:
            self._start()
        finally:
            del os.environ["RH_TEST_CANARY"]

    def _start(self) -> None:
        t0 = time.monotonic()
        self.procs["head"] = rn.start_head(ports=self.ports, temp_dir=f"{self.root}/head",
                                           token=self.token, log_path=f"{self.root}/head.log")
        rn.wait_head_ready(self.ports, self.token, timeout_s=60)
        self.timings["head_ready_s"] = time.monotonic() - t0
        t0, files = time.monotonic(), {}
        for name, resources in WORKERS.items():
            self.cwds[name] = cwd = f"{self.root}/cwd-{name}"
            os.mkdir(cwd)
            files[name] = f"{self.root}/node-{name}.json"
            self.procs[name] = rn.start_worker(
                gcs_address=self.ports.gcs_address, temp_dir=f"{self.root}/{name}",
                token=self.token, resources=resources, num_cpus=1, object_store_mb=80,
                node_ports_base=self.worker_bases[name], node_id_file=files[name],
                log_path=f"{self.root}/{name}.log", cwd=cwd)
        deadline = time.monotonic() + 60
        while len(self.node_ids) < len(WORKERS):
            for name, path in files.items():
                if name not in self.node_ids and os.path.exists(path):
                    with open(path) as f:
                        self.node_ids[name] = json.load(f)["node_id"]
                    self.timings[f"worker_{name}_node_id_s"] = time.monotonic() - t0
                assert self.procs[name].poll() is None, self.log(name)
            assert time.monotonic() < deadline, "workers did not write their node ids"
            time.sleep(0.1)

    def start_driver(self) -> dict:
        os.mkdir(f"{self.root}/driver")
        env = {**rn.ray_env(self.token), "PYTHONPATH": rn.python_path()}
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, self.ports.gcs_address], env=env,
                                cwd=f"{self.root}/driver", stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs["driver"] = proc
        line = proc.stdout.readline()
        assert line, f"driver failed (rc={proc.wait(timeout=30)})"
        return json.loads(line)

    def log(self, name: str) -> str:
        with open(f"{self.root}/{name}.log", errors="replace") as f:
            return f.read()[-3000:]

    def members(self) -> list[psutil.Process]:
        """Every live process of our groups, plus any descendant that left its group."""
        found: dict[int, psutil.Process] = {}
        pgids = {p.pid for p in self.procs.values()}
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) in pgids and proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.pid] = proc
            except (ProcessLookupError, psutil.Error):
                pass
        for pid in pgids:
            try:
                found.update((c.pid, c) for c in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                pass
        return list(found.values())

    def listeners(self) -> set[tuple[str, int, str]]:
        out = set()
        for proc in self.members():
            try:
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        out.add((conn.laddr.ip, conn.laddr.port, proc.name()))
            except psutil.Error:
                pass
        return out

    def teardown(self) -> None:
        driver = self.procs.get("driver")
        if driver is not None and driver.poll() is None:
            driver.stdin.close()
            try:
                driver.wait(timeout=20)
            except subprocess.TimeoutExpired:
                rn.stop_process(driver)
        for name in [*WORKERS, "head"]:
            if name in self.procs:
                t0 = time.monotonic()
                rn.stop_process(self.procs[name])
                self.timings.setdefault(f"stop_{name}_s", time.monotonic() - t0)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.teardown()
        print(f"\nray_node timings: {json.dumps({k: round(v, 2) for k, v in c.timings.items()})}")
        shutil.rmtree(c.root, ignore_errors=True)


def test_pinned_task_lands_on_worker_b_in_its_cwd(cluster):
    res = cluster.start_driver()
    cluster.timings.update(driver_init_s=res["init_s"], first_task_s=res["first_task_s"])
    assert res["node_id"] == cluster.node_ids["B"]
    assert res["node_id"] != cluster.node_ids["A"]
    # Tasks inherit the raylet's cwd, i.e. the empty directory given to start_worker.
    assert res["cwd"] == cluster.cwds["B"] and res["cwd_entries"] == []
    assert not res["canary"]


def test_every_listener_is_on_loopback(cluster):
    listeners = cluster.listeners()
    ports = {port for _, port, _ in listeners}
    assert {cluster.ports.gcs, cluster.ports.dashboard} <= ports
    for name, base in cluster.worker_bases.items():
        assert HeadPorts.from_base(base).node_manager in ports, name
    assert not [entry for entry in listeners if entry[0] not in LOOPBACK_ADDRS], listeners


def test_dashboard_requires_the_token(cluster):
    url = f"{cluster.ports.dashboard_url}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 401
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def test_teardown_leaves_nothing_behind(cluster):
    members, listeners = cluster.members(), cluster.listeners()
    assert members and listeners
    cluster.teardown()
    alive = [p for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
    for _, port, _ in listeners:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still listens"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv (util-linux)")
def test_ray_processes_get_none_of_the_roles_ambient_capabilities(tmp_path):
    """validator-core may hold CAP_NET_ADMIN (its firewall); what it spawns for Ray must not."""
    code = ("import subprocess, sys; from cluster.fabric import ray_node\n"
            "amb = lambda text: text.split('CapAmb:')[1].split()[0]\n"
            "print('plain', amb(subprocess.run(['cat', '/proc/self/status'], capture_output=True, text=True).stdout))\n"
            f"p = ray_node.spawn(['cat', '/proc/self/status'], {{}}, {str(tmp_path / 'out')!r}, {str(tmp_path)!r})\n"
            f"p.wait(); print('spawned', amb(open({str(tmp_path / 'out')!r}).read()))\n")
    # the role as systemd starts it with AmbientCapabilities=CAP_NET_ADMIN (here as root: the
    # ambient set is what is inherited across exec, whoever the user)
    out = subprocess.run(["setpriv", "--inh-caps=+net_admin", "--ambient-caps=+net_admin", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60, cwd=str(REPO),
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["plain", "0000000000001000", "spawned", "0000000000000000"]
