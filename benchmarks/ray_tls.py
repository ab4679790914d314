"""``python -m benchmarks.ray_tls``: what Ray's own gRPC TLS (``RAY_USE_TLS=1``) would cost
rayhorde's fabric, measured on a head and one worker node on loopback, with and without TLS,
clusters alternated so both see the same machine:

    ray_tls_task_p50_ratio   a tiny task pinned to the worker node, sequential round trips
    ray_tls_put_get_ratio    a 4 MiB object made on the worker and fetched by the driver
    ray_tls_join_ratio       worker node start -> registered in the GCS

Certificates come from :mod:`cluster.devstack.certs` (one for 127.0.0.1, shared by every Ray
process, as Ray's TLS expects). Nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import bench
from cluster.devstack.certs import make_ca
from cluster.fabric import ray_node
from cluster.fabric.ports import PORT_BLOCK, HeadPorts, find_free_port_base

DRIVER = r"""
import json, sys, time, ray, numpy
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote(num_cpus=0, resources={"bench": 0.001})
def noop():
    return 1
@ray.remote(num_cpus=0, resources={"bench": 0.001})
def blob():
    return numpy.ones(4 * 2**20, dtype=numpy.uint8)
for _ in range(10):
    ray.get(noop.remote())
lat = []
for _ in range(200):
    t0 = time.perf_counter(); ray.get(noop.remote()); lat.append(time.perf_counter() - t0)
lat.sort()
big = []
for _ in range(15):
    t0 = time.perf_counter(); ray.get(blob.remote()); big.append(time.perf_counter() - t0)
print(json.dumps({"task_p50_s": lat[len(lat) // 2], "put_get_s": sorted(big)[len(big) // 2]}), flush=True)
"""



def one_cluster(root: Path, tls_env: dict[str, str]) -> dict[str, float]:
    token = os.urandom(16).hex()
    base = find_free_port_base(block=2 * PORT_BLOCK)
    ports = HeadPorts.from_base(base)
    tmp = tempfile.mkdtemp(prefix="rh-tls-", dir="/tmp")
    procs = []
    try:
        procs.append(ray_node.start_head(ports=ports, temp_dir=f"{tmp}/h", token=token, log_path=f"{root}/head.log",
                                         extra_env=tls_env))
        ray_node.wait_head_ready(ports, token, timeout_s=120)
        node_file = f"{tmp}/node.json"
        t0 = time.monotonic()
        procs.append(ray_node.start_worker(gcs_address=ports.gcs_address, temp_dir=f"{tmp}/w", token=token,
                                           resources={"bench": 1}, num_cpus=1, object_store_mb=100,
                                           node_ports_base=base + PORT_BLOCK, node_id_file=node_file,
                                           log_path=f"{root}/worker.log", cwd=f"{tmp}/cwd", extra_env=tls_env))
        while not os.path.exists(node_file):
            if procs[-1].poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError(f"worker did not join; see {root}/worker.log")
            time.sleep(0.05)
        join_s = time.monotonic() - t0
        env = {**ray_node.ray_env(token), "PYTHONPATH": ray_node.python_path(), **tls_env}
        out = subprocess.run([sys.executable, "-c", DRIVER, ports.gcs_address], env=env, capture_output=True,
                             text=True, timeout=300, cwd=tmp)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return {"join_s": join_s, **json.loads(out.stdout.splitlines()[-1])}
    finally:
        for p in reversed(procs):
            ray_node.stop_process(p)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="rh-bench-tls-"))
    ca = make_ca(root / "ca")
    cert, key = ca.issue(root / "tls", "ray", ["127.0.0.1", "localhost"], client_auth=True)
    tls = {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(cert), "RAY_TLS_SERVER_KEY": str(key),
           "RAY_TLS_CA_CERT": str(ca.cert_path)}
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "tls": []}
    for _ in range(2):  # alternated
        runs["plain"].append(one_cluster(root, {}))
        runs["tls"].append(one_cluster(root, tls))

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    for key, name, unit in (("task_p50_s", "ray_tls_task_p50_ratio", "ms"), ("put_get_s", "ray_tls_put_get_ratio", "ms"),
                            ("join_s", "ray_tls_join_ratio", "s")):
        scale = 1000 if unit == "ms" else 1
        bench(name, med("tls", key) / med("plain", key), "x",
              f"{med('tls', key) * scale:.2f} {unit} with RAY_USE_TLS vs {med('plain', key) * scale:.2f} {unit} without")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
