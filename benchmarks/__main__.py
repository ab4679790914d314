"""``make bench``: one line per figure, ``BENCH <name> <value> <unit>``, so figures can be compared
across commits.

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
from cluster.protocol.identity import Hotkey, create_dev_wallet  # noqa: E402
from cluster.devstack.local_stack import LocalStack  # noqa: E402
from cluster.fabric.ray_node import short_tmp  # noqa: E402
from cluster.resources import config_path  # noqa: E402
from cluster.protocol.user import request_capability  # noqa: E402
from benchmarks.report import bench  # noqa: E402

IMAGE = "rayhorde/busybox:local"
TRIVIAL = ["sh", "-c", "echo hi"]
DOCKER_HOST = "unix:///run/rayhorde-docker.sock"



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


def _latency_ratio(name: str, call_direct, call_proxy, n: int, warm: int = 5) -> None:
    """Interleaved calls, so both paths see the same machine; p50 (and p99 for long runs)."""
    for _ in range(warm):
        call_direct(), call_proxy()
    lat: dict[str, list[float]] = {"direct": [], "proxy": []}
    for _ in range(n):
        for key, fn in (("direct", call_direct), ("proxy", call_proxy)):
            t0 = time.perf_counter()
            fn()
            lat[key].append(time.perf_counter() - t0)
    q = {k: statistics.quantiles(v, n=100) for k, v in lat.items()}
    bench(f"proxy_p50_ratio_{name}", q["proxy"][49] / q["direct"][49], "x",
          f"p50 {q['proxy'][49] * 1000:.1f} ms via the miner proxy vs {q['direct'][49] * 1000:.1f} ms direct")
    if n >= 100:
        bench(f"proxy_p99_ratio_{name}", q["proxy"][98] / q["direct"][98], "x",
              f"p99 {q['proxy'][98] * 1000:.1f} ms vs {q['direct'][98] * 1000:.1f} ms")


def proxy_benchmarks(state: dict, cap: str) -> None:
    """Streaming jobs deployed through validator-core onto a miner: signed calls through the
    miner's proxy (in its agent: envelope check, receipt counter-signature, receipt kept) vs the
    same signed calls straight to the job's Serve route on the node's loopback Serve proxy."""
    import threading

    import httpx

    from serve_apps import SigningKey, StreamSpec, Streams
    from cluster.protocol.client_envelope import RequestSigner

    streams = Streams(state["validator_url"], cap)
    client = SigningKey()
    serve_url = f"http://127.0.0.1:{int(state['gcs_address'].rsplit(':', 1)[1]) + 9}"
    job = streams.deploy(StreamSpec(app="echo", version="1", client_keys=[client.public]))
    job.wait_ready(timeout_s=120)
    direct, via = serve_url + job.view.route_prefix, job.base_url
    try:
        body = b'{"prompt": "' + b"x" * 200 + b'"}'
        clients = {b: httpx.Client(base_url=b, auth=RequestSigner(client, job.job_id), timeout=30) for b in (direct, via)}

        def echo(base: str):
            def call() -> None:
                r = clients[base].post("/echo", content=body)
                assert r.status_code == 200, r.text
            return call

        _latency_ratio("echo", echo(direct), echo(via), n=300, warm=20)

        def throughput(base: str, concurrency: int, seconds: float = 4) -> float:
            done = [0] * concurrency
            stop = time.perf_counter() + seconds

            def worker(i: int) -> None:
                with httpx.Client(base_url=base, auth=RequestSigner(client, job.job_id), timeout=30) as c:
                    while time.perf_counter() < stop:
                        assert c.post("/echo", content=body).status_code == 200
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
        job.terminate()
    llm_proxy_benchmark(streams, serve_url)
    streams.close()


def llm_proxy_benchmark(streams, serve_url: str) -> None:
    """The LLM app (vLLM CPU) on a miner: a short greedy chat completion via proxy vs direct."""
    import httpx

    from serve_apps import SigningKey, StreamSpec
    from cluster.protocol.client_envelope import RequestSigner
    from cluster.protocol.whitelist import Whitelist

    entry = next((e for e in Whitelist.load(config_path("serve_apps.toml")).apps if e.name == "llm"), None)
    if entry is None:
        print("# proxy_p50_ratio_llm: no llm entry in configs/serve_apps.toml", flush=True)
        return
    client = SigningKey()
    job = streams.deploy(StreamSpec(app="llm", version=entry.version, client_keys=[client.public]))
    try:
        job.wait_ready(timeout_s=600)
        direct, via = serve_url + job.view.route_prefix, job.base_url
        body = json.dumps({"model": "smollm2-135m-instruct-fp32", "temperature": 0, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "Name three colours."}]}).encode()
        clients = {b: httpx.Client(base_url=b, auth=RequestSigner(client, job.job_id), timeout=120)
                   for b in (direct, via)}

        def chat(base: str):
            def call() -> None:
                r = clients[base].post("/v1/chat/completions", content=body,
                                       headers={"content-type": "application/json"})
                assert r.status_code == 200, r.text
            return call

        _latency_ratio("llm", chat(direct), chat(via), n=15, warm=2)
    finally:
        job.terminate()


def main(only: str | None = None) -> int:
    """``python -m benchmarks [proxy]``: everything, or only the streaming proxy figures."""
    engine = docker.DockerClient(base_url=DOCKER_HOST)
    home = Path(tempfile.mkdtemp(prefix="rh-bench-"))
    metagraph = json.loads(config_path("metagraph.local.json").read_text())
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
        if only == "proxy":
            proxy_benchmarks(state, cap)
            return 0

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
            "name": "newcomer", "home": home / "newcomer", "wallet_path": home / "stack" / "wallets",
            "wallet_name": "newcomer", "validator_url": state["validator_url"],
            "validator_hotkey": Hotkey.from_uri("//Alice").ss58, "ray_temp_dir": short_tmp(home, "new")}.items()}}
        create_dev_wallet(home / "stack" / "wallets", "newcomer", "//Eve")
        probe = ray.remote(lambda: time.time()).options(num_cpus=0, resources={f"miner:{newcomer.ss58}": 0.001})
        t0 = time.time()
        newcomer_proc = subprocess.Popen([sys.executable, "-m", "cluster.miner.main", "--config",
                                          str(config_path("miner.local.toml"))], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        ran_at = ray.get(probe.remote(), timeout=120)
        bench("miner_join_s", ran_at - t0, "s", "agent start (admission + Ray node) -> first pinned task runs")

        proxy_benchmarks(state, cap)
    finally:
        if newcomer_proc is not None:
            from cluster.fabric.ray_node import stop_process
            stop_process(newcomer_proc)
        if ray.is_initialized():
            ray.shutdown()
        stack.down()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
