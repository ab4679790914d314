"""Integration test of the private verification cluster (cluster.verification):
a Ray head whose autoscaler (fake multi-node provider locally) adds a ``gpu80`` worker when a
VerifierActor asks for ``gpu80gb`` and removes it once idle.

This is the PLUMBING test: the verifier is ``tests.cluster.verification.verification_factories:echo_verifier``,
which answers ``ok`` to every claim without checking anything. It proves placement (the actor
runs only on an autoscaled worker, never on the head), scale-up, the JSON boundary, close + kill,
scale-down and teardown. The real prefill verifier (``cluster.verification.verifier``)
is plugged in by its "module:callable" name in the same way, by its own tests.

Why it looks like this:
* The cluster is private to the validator (no miner joins it), so it has its own head, token and
  autoscaler.
* The cluster is started by ``ray start --head --block --autoscaling-config=...`` on its own
  explicit ports, token and temp dir, in the same pytest process that may hold a ``ray.init``
  to the session's public cluster (the ``stack`` fixture): so this test never calls ``ray.init``;
  the verification driver is a SEPARATE process (``VerificationClient`` runs
  ``python -m cluster.verification.actors run-batch``), and the test inspects the
  cluster over the State API (HTTP + token).
* Timings are printed at teardown (``verification timings: {...}``).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from cluster.fabric import processes, ray_node
from cluster.fabric.ports import listening_ports
from cluster.fabric.processes import find_by_folder
from cluster.verification.actors import load_factory
from cluster.verification.cluster import CUSTOM_RESOURCE, FAKE_PROVIDER, WORKER_TYPE, VerificationCluster
from cluster.verification.models import Claim
from cluster.protocol.keys import PublicKey
from cluster.protocol.receipts import Receipt, ReceiptBody


FACTORY = "tests.cluster.verification.verification_factories:echo_verifier"
MARGIN = 0.25
LOOPBACK_ADDRS = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
# Keeps one gpu80 worker up without an actor (the autoscaler honours explicit requests).
HOLD_WORKER = r"""
import sys, ray
from ray.autoscaler.sdk import request_resources
ray.init(address=sys.argv[1], log_to_driver=False)
request_resources(bundles=[{"gpu80gb": 1}])
print("requested", flush=True)
sys.stdin.read()
"""


def make_claim(i: int) -> Claim:
    """A structurally valid claim (unsigned: the echo verifier checks nothing)."""
    envelope = json.dumps({"i": i, "path": "/v1/chat/completions"}).encode()
    rid = hashlib.sha256(envelope).hexdigest()
    body = ReceiptBody(job_id="job-1", request_id=rid, t_from=1, t_to=2,
                       input_sha256=hashlib.sha256(b"{}").hexdigest(), output_sha256="1" * 64,
                       job_key=PublicKey(public="a" * 64), miner_hotkey="5Miner", seq=i, prev_sha256="0" * 64)
    return Claim(job_id="job-1", miner_hotkey="5Miner", weights_sha256="2" * 64, route_prefix="/jobs/job-1",
                 envelope=envelope, client_sig="00", request_body=b"{}", response_body=f"answer {i}".encode(),
                 receipt=Receipt(body=body, job_sig="00", miner_sig="00"))


def _alive(pids: dict[int, float]) -> list[int]:
    return sorted(processes.live(pids))


def _cmdline(pid: int) -> str:
    try:
        return "\0".join(psutil.Process(pid).cmdline())
    except psutil.ZombieProcess:  # exited meanwhile: no command line left (an empty /proc/<pid>/cmdline)
        return ""


def _non_loopback_listeners(ports: set[int]) -> list[str]:
    """Listening TCP sockets (v4 and v6) on ``ports`` bound to anything but loopback."""
    return [f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in ports and c.laddr.ip not in LOOPBACK_ADDRS]


def test_config_renders_for_the_fake_provider(tmp_path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    c = VerificationCluster(tmp_path / "cfg", port_base=21000)
    cfg = c.render_config()
    validate_config(prepare_config(cfg))  # Ray's own schema
    prov = cfg["provider"]
    assert (prov["type"], prov["module"], prov["gcs_address"]) == ("external", FAKE_PROVIDER, "127.0.0.1:21000")
    assert prov["use_node_id_as_ip"] and prov["disable_node_updaters"]
    assert 0 < cfg["idle_timeout_minutes"] < 1
    head = cfg["available_node_types"][cfg["head_node_type"]]
    worker = cfg["available_node_types"][WORKER_TYPE]
    assert head["resources"].get(CUSTOM_RESOURCE, 0) == 0 and head["max_workers"] == 0
    assert worker["resources"][CUSTOM_RESOURCE] == 1 and worker["min_workers"] == 0 and worker["max_workers"] >= 1
    assert all(isinstance(v, int) for v in worker["resources"].values())
    assert not (tmp_path / "cfg").exists()  # nothing is written before start()


def test_load_factory():
    assert load_factory(FACTORY)().verify_batch([make_claim(0)], 0.5)[0].ok
    for bad in ("tests.cluster.verification.verification_factories", ":x", "tests.cluster.verification.verification_factories:"):
        with pytest.raises(ValueError):
            load_factory(bad)
    with pytest.raises(AttributeError):
        load_factory("tests.cluster.verification.verification_factories:nope")


@pytest.fixture(scope="module")
def vcluster(tmp_path_factory):
    c = VerificationCluster(tmp_path_factory.mktemp("verification"))
    c.timings = {}
    try:
        t0 = time.monotonic()
        c.start()
        c.timings["head_start_s"] = time.monotonic() - t0
        yield c
    finally:
        t0 = time.monotonic()
        c.stop()
        c.timings.setdefault("stop_s", time.monotonic() - t0)
        print(f"\nverification timings: {json.dumps({k: round(v, 2) for k, v in c.timings.items()})}")


@pytest.mark.integration
@pytest.mark.slow
def test_head_only_no_gpu80_worker_and_token_required(vcluster):
    assert vcluster.workers() == []
    (head,) = vcluster.nodes()
    assert head["is_head_node"] and head["resources_total"].get(CUSTOM_RESOURCE, 0) == 0
    url = f"{vcluster.dashboard_url}/api/v0/nodes"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 401
    ports = vcluster.recorded_ports
    assert {vcluster.ports.gcs, vcluster.ports.dashboard} <= ports
    assert not _non_loopback_listeners(ports)


@pytest.mark.integration
@pytest.mark.slow
def test_batch_scales_up_one_worker_and_it_idles_out(vcluster):
    claims = [make_claim(i) for i in range(3)]
    head_id = vcluster.head_node_id()
    t0 = time.monotonic()
    res = vcluster.client().run_batch(claims, MARGIN, FACTORY, {"tag": "plumbing"}, timeout_s=240,
                                      scale_up_timeout_s=120)
    vcluster.timings.update(batch_total_s=time.monotonic() - t0, scale_up_s=res.timings["scale_up_s"],
                            actor_ready_s=res.timings["actor_ready_s"], verify_s=res.timings["verify_s"])
    # Verdicts: one per claim, in order, JSON round-tripped, named after the actor and its node.
    assert [v.request_id for v in res.verdicts] == [c.request_id for c in claims]
    assert all(v.ok and v.reason == "ok" and v.margin == MARGIN and v.message.startswith("plumbing")
               for v in res.verdicts)
    actor_id, node_id = res.actor["actor_id"], res.actor["node_id"]
    assert {v.verifier for v in res.verdicts} == {f"{actor_id}@{node_id}"}
    # The autoscaler added exactly one worker, with the custom resource, and the actor ran there.
    everyone = {n["node_id"]: n for n in vcluster.nodes(include_dead=True)}
    gpu_nodes = [n for n in everyone.values() if n["resources_total"].get(CUSTOM_RESOURCE, 0) > 0]
    assert [n["node_id"] for n in gpu_nodes] == [node_id]
    assert node_id != head_id and not everyone[node_id]["is_head_node"]
    assert everyone[node_id]["resources_total"][CUSTOM_RESOURCE] == 1
    # The actor was killed after the batch: the worker idles out (bound: idle timeout + 30 s).
    bound = vcluster.idle_timeout_s + 30
    vcluster.wait_workers(0, timeout_s=bound)
    vcluster.timings["scale_down_s"] = time.time() - res.timings["killed_at"]
    assert vcluster.timings["scale_down_s"] < bound
    dead = {n["node_id"]: n for n in vcluster.nodes(include_dead=True)}[node_id]
    assert dead["state"] == "DEAD"


@pytest.mark.integration
@pytest.mark.slow
def test_a_warm_verifier_serves_the_next_batch_then_exits_and_the_worker_goes(vcluster):
    vcluster.wait_workers(0, timeout_s=vcluster.idle_timeout_s + 30)  # the previous test's worker
    warm = 6.0
    first = vcluster.client().run_batch([make_claim(i) for i in range(2)], MARGIN, FACTORY, {"tag": "warm"},
                                        timeout_s=240, scale_up_timeout_s=120, keep_warm_s=warm)
    second = vcluster.client().run_batch([make_claim(i) for i in range(2, 5)], MARGIN, FACTORY, {"tag": "warm"},
                                         timeout_s=240, scale_up_timeout_s=120, keep_warm_s=warm)
    # the same actor (same process: the model loaded once), found by its name from another driver
    assert second.actor["actor_id"] == first.actor["actor_id"] and second.actor["pid"] == first.actor["pid"]
    assert first.actor["batches"] == 0 and second.actor["batches"] == 1 and second.timings["verifier_init_s"] == 0
    assert {v.verifier for v in first.verdicts + second.verdicts} == {first.verdicts[0].verifier}
    assert len(vcluster.workers()) == 1
    # idle for ``warm`` seconds: it closes its verifier and exits; then the worker idles out
    t0 = time.time()
    vcluster.wait_workers(0, timeout_s=warm + vcluster.idle_timeout_s + 30)
    vcluster.timings["warm_exit_and_scale_down_s"] = time.time() - t0
    # a later batch starts a fresh actor
    third = vcluster.client().run_batch([make_claim(9)], MARGIN, FACTORY, {"tag": "warm"}, timeout_s=240,
                                        scale_up_timeout_s=120, keep_warm_s=warm)
    assert third.actor["actor_id"] != first.actor["actor_id"] and third.actor["batches"] == 0
    vcluster.wait_workers(0, timeout_s=warm + vcluster.idle_timeout_s + 30)


@pytest.mark.integration
@pytest.mark.slow
def test_stop_leaves_no_process_and_no_port(vcluster):
    """With a fake worker node up (held by an explicit resource request), ``stop`` kills the
    head, the autoscaler's fake node and the driver holding it; no pid or port survives."""
    env = {**ray_node.ray_env(vcluster.token), "PYTHONPATH": ray_node.python_path()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WORKER, vcluster.gcs_address], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "requested"
        (worker,) = vcluster.wait_workers(1, timeout_s=90)
        found = vcluster.record()
        # Fake nodes are found by their files / cwd alone, not only as the head's descendants.
        by_markers = find_by_folder(vcluster.temp_dir, [])
        assert set(processes.descendants(vcluster.head.pid)) <= set(by_markers)
        assert holder.pid in found  # a driver of this cluster is part of it
        pids, ports = vcluster.recorded_pids, vcluster.recorded_ports
        assert ports - set(range(vcluster.ports.gcs, vcluster.ports.max_worker + 1))  # the fake node's
        assert not _non_loopback_listeners(ports)
        t0 = time.monotonic()
        vcluster.stop()
        vcluster.timings["stop_s"] = time.monotonic() - t0
        assert _alive(pids) == []
        assert find_by_folder(vcluster.temp_dir, []) == {}
        deadline = time.monotonic() + 5  # a closing socket may linger for a moment
        while listening_ports(ports) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert listening_ports(ports) == set()
        assert not os.path.exists(vcluster.temp_dir)
    finally:
        if holder.poll() is None:
            ray_node.stop_process(holder)
        holder.wait(timeout=10)


@pytest.mark.integration
@pytest.mark.slow
def test_orphaned_fake_nodes_are_found_by_their_files(tmp_path):
    """A crashed head (SIGKILL, so nothing tears down) leaves the autoscaler's fake node
    orphaned and renamed (``ray::...``); with the PID record lost, ``stop_recorded`` still
    finds every process through the cluster's temp dir (cwd / open files) and kills it."""
    c = VerificationCluster(tmp_path / "crash")
    holder = None
    try:
        c.start()
        env = {**ray_node.ray_env(c.token), "PYTHONPATH": ray_node.python_path()}
        holder = subprocess.Popen([sys.executable, "-c", HOLD_WORKER, c.gcs_address], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert holder.stdout.readline().strip() == "requested"
        c.wait_workers(1, timeout_s=90)
        everything = c.record()
        os.kill(c.head.pid, 9)
        c.head.wait(timeout=10)
        time.sleep(1)
        orphans = find_by_folder(c.temp_dir, [])
        table = processes.table()
        assert orphans and set(orphans) <= set(everything)
        assert any(table[p].ppid not in everything for p in orphans if p in table)  # reparented
        renamed = [p for p in orphans if p in table and c.temp_dir not in _cmdline(p)]
        assert renamed  # e.g. ray::RuntimeEnvAgent: found by cwd / files, not by name or args
        state = json.loads(c.state_file.read_text())
        state["pids"] = {}  # the record is lost too
        c.state_file.write_text(json.dumps(state))
        VerificationCluster.stop_recorded(c.state_file)
        assert _alive(everything) == []
        assert find_by_folder(c.temp_dir, []) == {}
    finally:
        c.stop()
        if holder is not None:
            if holder.poll() is None:
                ray_node.stop_process(holder)
            holder.wait(timeout=10)
