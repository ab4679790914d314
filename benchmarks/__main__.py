"""``make bench``: one line per figure, ``BENCH <name> <value> <unit>`` (DESIGN §4).

Ratios are measured against their baseline in the same run, interleaved, median of several
runs, because these machines are shared and noisy. Nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read at import: keep the driver on loopback
os.environ["RAY_AUTH_MODE"] = "token"

import docker  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402

import jobs  # noqa: E402
from cluster._private.identity import Hotkey  # noqa: E402
from cluster._private.local_stack import LocalStack, short_tmp  # noqa: E402
from cluster._private.settings import REPO_ROOT  # noqa: E402
from cluster._private.user import request_capability  # noqa: E402

IMAGE = "rayhorde/busybox:local"
TRIVIAL = ["sh", "-c", "echo hi"]
DOCKER_HOST = "unix:///run/rayhorde-docker.sock"


def bench(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"BENCH {name} {value:.4g} {unit}" + (f"   # {note}" if note else ""), flush=True)


def pss_mb(pids: list[int]) -> float:
    total = 0
    seen = set()
    for pid in pids:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    return total / 2**20


def proxy_benchmarks(state: dict) -> None:
    """The echo app on Serve pinned to miner1: signed calls through the miner proxy (envelope
    check, receipt counter-signature) vs the same signed calls straight to the Serve route."""
    import socket
    import threading

    import httpx
    from ray import serve

    from cluster._private.ray_node import stop_process
    from serve_apps import RequestSigner, SigningKey
    from serve_apps.echo import EchoApp

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    miner = Hotkey.from_uri("//Bob")
    client = SigningKey()
    job, prefix = "bench-echo", "/jobs/bench-echo"
    serve_port, proxy_port = free_port(), free_port()
    serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": serve_port,
                                                          "request_timeout_s": 30})
    dep = serve.deployment(EchoApp, name="echo", max_ongoing_requests=128, max_queued_requests=512,
                           ray_actor_options={"num_cpus": 0, "resources": {f"miner:{miner.ss58}": 0.01}})
    serve.run(dep.bind(job, miner.ss58, [client.public.model_dump()], route_prefix=prefix), name=job,
              route_prefix=prefix)
    direct = f"http://127.0.0.1:{serve_port}"
    key = httpx.get(f"{direct}{prefix}/-/key", timeout=30).json()["job_key"]
    spec = {"job_id": job, "upstream": direct, "client_keys": [client.public.model_dump()], "job_key": key}
    proxy = subprocess.Popen([sys.executable, "-m", "cluster._private.miner.proxy", "--port", str(proxy_port),
                              "--miner-uri", "//Bob", "--job", json.dumps(spec)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    via = f"http://127.0.0.1:{proxy_port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(f"{via}/jobs/none/x", timeout=1)
                break
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        clients = {base: httpx.Client(base_url=base, auth=RequestSigner(client, job), timeout=30)
                   for base in (direct, via)}
        body = b'{"prompt": "' + b"x" * 200 + b'"}'

        def once(base: str) -> float:
            t0 = time.perf_counter()
            r = clients[base].post(f"{prefix}/echo", content=body)
            assert r.status_code == 200, r.text
            return time.perf_counter() - t0

        for base in (direct, via):
            for _ in range(20):
                once(base)
        lat: dict[str, list[float]] = {direct: [], via: []}
        for _ in range(300):  # interleaved, so both see the same machine
            lat[direct].append(once(direct))
            lat[via].append(once(via))
        q = {b: statistics.quantiles(v, n=100) for b, v in lat.items()}
        bench("proxy_p50_ratio_echo", q[via][49] / q[direct][49], "x",
              f"p50 {q[via][49] * 1000:.1f} ms via proxy vs {q[direct][49] * 1000:.1f} ms direct")
        bench("proxy_p99_ratio_echo", q[via][98] / q[direct][98], "x",
              f"p99 {q[via][98] * 1000:.1f} ms vs {q[direct][98] * 1000:.1f} ms")

        def throughput(base: str, concurrency: int, seconds: float = 4) -> float:
            done = [0] * concurrency
            stop = time.perf_counter() + seconds

            def worker(i: int) -> None:
                with httpx.Client(base_url=base, auth=RequestSigner(client, job), timeout=30) as c:
                    while time.perf_counter() < stop:
                        assert c.post(f"{prefix}/echo", content=body).status_code == 200
                        done[i] += 1

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return sum(done) / (time.perf_counter() - t0)

        for c in (16, 64):
            d, p = throughput(direct, c), throughput(via, c)
            bench(f"proxy_tput_ratio_echo_c{c}", p / d, "x", f"{p:.0f} req/s via proxy vs {d:.0f} direct")
    finally:
        stop_process(proxy)
        serve.shutdown()


def main() -> int:
    engine = docker.DockerClient(base_url=DOCKER_HOST)
    home = Path(tempfile.mkdtemp(prefix="rh-bench-"))
    metagraph = json.loads((REPO_ROOT / "configs/metagraph.local.json").read_text())
    newcomer = Hotkey.from_uri("//Eve")
    metagraph["neurons"].append({"uid": 3, "hotkey": newcomer.ss58, "stake_rao": 1, "validator_permit": False})
    (home / "metagraph.json").write_text(json.dumps(metagraph))
    stack = LocalStack(home / "stack", miners=2, executors_per_miner=2,
                       validator_env={"RAYHORDE_VALIDATOR_METAGRAPH_PATH": str(home / "metagraph.json")})
    state = stack.up()
    newcomer_proc = None
    try:
        os.environ["RAY_AUTH_TOKEN"] = Path(state["token_path"]).read_text().strip()
        ray.init(address=state["gcs_address"], log_to_driver=False)
        cap = request_capability(state["validator_url"], Hotkey.from_uri("//Dave"), max_jobs=10_000, ttl_s=3600)

        def run_one() -> float:
            t0 = time.perf_counter()
            view = jobs.submit({"image": IMAGE, "command": TRIVIAL}, validator_url=state["validator_url"],
                               capability=cap).result(timeout_s=120)
            assert view.status.value == "completed", view
            return time.perf_counter() - t0

        def docker_one() -> float:
            t0 = time.perf_counter()
            engine.containers.run(IMAGE, TRIVIAL, remove=True, network_mode="none")
            return time.perf_counter() - t0

        for _ in range(2):  # warm both paths (worker processes, image cache)
            run_one(), docker_one()
        ours, base = [], []
        for _ in range(9):
            ours.append(run_one())
            base.append(docker_one())
        ratio = statistics.median(ours) / statistics.median(base)
        bench("organic_e2e_vs_docker_ratio", ratio, "x",
              f"median {statistics.median(ours) * 1000:.0f} ms vs docker-py {statistics.median(base) * 1000:.0f} ms")

        n = 100  # submitted at once; validator-core queues what 2 miners x 2 executors cannot take yet
        t0 = time.perf_counter()
        handles = [jobs.submit({"image": IMAGE, "command": TRIVIAL, "max_wait_s": 600},
                               validator_url=state["validator_url"], capability=cap) for _ in range(n)]
        views = [h.result(timeout_s=600) for h in handles]
        elapsed = time.perf_counter() - t0
        assert all(v.status.value == "completed" for v in views)
        bench("organic_jobs_per_s", n / elapsed, "jobs/s", f"{n} jobs submitted at once, 2 miners x 2 executors")
        t0 = time.perf_counter()  # what the engine itself allows: the same containers, 4 at a time
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: docker_one(), range(n)))
        bench("docker_jobs_per_s", n / (time.perf_counter() - t0), "jobs/s", "baseline: plain docker-py, 4 at a time")

        time.sleep(2)
        head = [state["pids"]["ray-head"]]
        bench("head_idle_mb", pss_mb(head), "MB", "PSS of the Ray head's process tree")
        miner_home = Path(state["miners"]["miner1"]["home"])
        node_pid = json.loads((miner_home / "node.json").read_text())["pid"]
        bench("miner_idle_mb", pss_mb([state["pids"]["miner1"], node_pid]), "MB", "agent + its Ray node")

        # miner_join_s: agent start -> first task scheduled on its new node
        env = {**os.environ, **{f"RAYHORDE_MINER_{k.upper()}": str(v) for k, v in {
            "name": "newcomer", "home": home / "newcomer", "wallet_dir": home / "stack" / "wallets",
            "wallet": "newcomer", "wallet_uri": "//Eve", "validator_url": state["validator_url"],
            "validator_hotkey": Hotkey.from_uri("//Alice").ss58, "ray_temp_dir": short_tmp(home, "new")}.items()}}
        probe = ray.remote(lambda: time.time()).options(num_cpus=0, resources={f"miner:{newcomer.ss58}": 0.001})
        t0 = time.time()
        newcomer_proc = subprocess.Popen([sys.executable, "-m", "cluster._private.miner.main", "--config",
                                          str(REPO_ROOT / "configs/miner.local.toml")], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        ran_at = ray.get(probe.remote(), timeout=120)
        bench("miner_join_s", ran_at - t0, "s", "agent start (admission + Ray node) -> first pinned task runs")

        proxy_benchmarks(state)
    finally:
        if newcomer_proc is not None:
            from cluster._private.ray_node import stop_process
            stop_process(newcomer_proc)
        if ray.is_initialized():
            ray.shutdown()
        stack.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
