"""What the ``topo_*`` benchmarks run inside the test hosts, one step per run:

    python -m tests.support.topo_bench STEP [ARGS...]

Started by :mod:`benchmarks.topology` in a host's network namespace (``Host.run``, environment from
``TopoStack.env``); the last stdout line is the step's JSON answer. Every loop is bounded in count
and time. Steps:

* ``organic GCS_ADDRESS NODE_IP VALIDATOR_URL CAP WARM ROUNDS`` (validator host): a Ray driver of
  the validator's cluster times trivial organic jobs submitted over HTTPS, interleaved with the
  same container run straight through docker-py on the engine's unix socket.
* ``echo_deploy VALIDATOR_URL CAP SEED_HEX EXECUTOR_CLASS`` (user host): deploys an ``echo``
  stream whose client key is the ed25519 seed ``SEED_HEX``, waits until it is ready and makes one
  call whose receipt is verified; answers the job id, route prefix, proxy URL and miner.
* ``echo_round BASE_URL JOB_ID SEED_HEX CALLS CONCURRENCY SECONDS`` (any host): ``CALLS`` signed
  calls one after another (latencies), then ``CONCURRENCY`` clients calling for ``SECONDS``
  (requests/s). ``BASE_URL`` is the miner's proxy (user host, HTTPS, verified against
  ``$RAYHORDE_CA_BUNDLE``) or the node's loopback Serve route (miner host, the baseline).
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from typing import Any

IMAGE = "rayhorde/busybox:local"
TRIVIAL = ["sh", "-c", "echo hi"]
DOCKER_HOST = "unix:///run/rayhorde-docker.sock"
BODY = b'{"prompt": "' + b"x" * 200 + b'"}'  # the loopback proxy benchmark's body
WARM_CALLS = 5
MAX_CALLS = 10_000  # a bound on every loop of calls, whatever the arguments say


def organic(gcs_address: str, node_ip: str, url: str, cap: str, warm: str, rounds: str) -> dict[str, Any]:
    import docker
    import ray

    import jobs

    # The driver joins the head from this host's address: name it, since a host with no default
    # route cannot find it the way Ray guesses (a UDP "connect" towards a public address).
    ray.init(address=gcs_address, _node_ip_address=node_ip, log_to_driver=False)
    engine = docker.DockerClient(base_url=DOCKER_HOST)
    miners: list[str] = []

    def ours() -> float:
        t0 = time.perf_counter()
        handle = jobs.submit({"image": IMAGE, "command": TRIVIAL}, validator_url=url, capability=cap)
        view = handle.result(timeout_s=120)
        elapsed = time.perf_counter() - t0
        if view.status.value != "completed":
            raise RuntimeError(f"organic job {view.job_id} ended {view.status.value}: {view.failure}")
        miners.append(view.miner_hotkey or "?")
        return elapsed

    def plain() -> float:
        t0 = time.perf_counter()
        engine.containers.run(IMAGE, TRIVIAL, remove=True, network_mode="none")
        return time.perf_counter() - t0

    try:
        for _ in range(min(int(warm), 10)):  # worker processes, image cache, HTTPS connections
            ours(), plain()
        miners.clear()
        times: dict[str, list[float]] = {"ours": [], "docker": []}
        for _ in range(min(int(rounds), 50)):
            times["ours"].append(ours())
            times["docker"].append(plain())
    finally:
        engine.close()
        ray.shutdown()
    return {**times, "miners": miners}


def echo_deploy(url: str, cap: str, seed_hex: str, executor_class: str) -> dict[str, Any]:
    from serve_apps import SigningKey, StreamSpec, Streams

    key = SigningKey(seed_hex)
    streams = Streams(url, cap)
    t0 = time.monotonic()
    job = streams.deploy(StreamSpec(app="echo", version="1", client_keys=[key.public], executor_class=executor_class))
    ready = job.wait_ready(timeout_s=180)
    answer = job.call(key, "/echo", BODY)  # through the proxy, its receipt verified
    if answer.status_code != 200 or answer.receipt is None:
        raise RuntimeError(f"echo through the proxy answered {answer.status_code}: {answer.content[:300]!r}")
    return {"job_id": job.job_id, "route_prefix": job.view.route_prefix, "proxy_url": ready.proxy_url,
            "miner": job.view.miner_hotkey, "ready_s": time.monotonic() - t0}


def echo_round(base: str, job_id: str, seed_hex: str, calls: str, concurrency: str, seconds: str) -> dict[str, Any]:
    import httpx

    from cluster.protocol.client_envelope import RequestSigner
    from cluster.protocol.http import tls_verify
    from serve_apps import SigningKey

    key = SigningKey(seed_hex)
    verify = tls_verify()  # $RAYHORDE_CA_BUNDLE: the proxy's certificate is checked

    def client() -> httpx.Client:
        return httpx.Client(base_url=base, auth=RequestSigner(key, job_id), timeout=30, verify=verify)

    def call(c: httpx.Client) -> None:
        r = c.post("/echo", content=BODY)
        if r.status_code != 200:
            raise RuntimeError(f"POST {base}/echo answered {r.status_code}: {r.text[:300]}")

    lat: list[float] = []
    with client() as c:
        for _ in range(WARM_CALLS):  # the connection (and its TLS handshake) is not what is measured
            call(c)
        for _ in range(min(int(calls), MAX_CALLS)):
            t0 = time.perf_counter()
            call(c)
            lat.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"p50_s": statistics.median(lat) if lat else None, "lat": lat, "tput_rps": None}
    n, window = int(concurrency), float(seconds)
    if n <= 0 or window <= 0:
        return out
    clients = [client() for _ in range(n)]
    for c in clients:  # each connection opened before the window, as a steady client's would be
        call(c)
    done = [0] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n + 1)
    stop_at: list[float] = []

    def worker(i: int) -> None:
        start.wait()
        try:
            while time.perf_counter() < stop_at[0] and done[i] < MAX_CALLS:
                call(clients[i])
                done[i] += 1
        except BaseException as exc:  # reported below; the other workers finish their window
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at.append(t0 + window)
    start.wait()
    for t in threads:
        t.join(window + 60)
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} clients failed; the first: {errors[0]!r}")
    out.update(tput_rps=sum(done) / elapsed, tput_calls=sum(done), tput_s=elapsed)
    return out


STEPS = {f.__name__: f for f in (organic, echo_deploy, echo_round)}

if __name__ == "__main__":
    step, *args = sys.argv[1:]
    print(json.dumps(STEPS[step](*args)), flush=True)
