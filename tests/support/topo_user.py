"""What the user host does in the topology tests and benchmarks, one step per run:

    python -m tests.support.topo_user STEP VALIDATOR_URL [ARGS...]

Run inside the ``user`` network namespace by :meth:`TopoStack.user`; the last stdout line is
the step's JSON answer. Only public doors are used: validator-core (and its Jobs door) over
HTTPS, the miner's proxy over HTTPS; the CA bundle comes from ``RAYHORDE_CA_BUNDLE``.
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

from cluster.protocol.http import ServiceClient
from cluster.protocol.identity import Hotkey
from cluster.protocol.user import request_capability
from cluster.resources import example_path

USER_URI = "//Dave"
RAY = str(Path(sys.executable).with_name("ray"))


def health(url: str) -> dict:
    return ServiceClient(url, timeout_s=5).get("/v1/health")


def untrusted(url: str, ca_path: str, *urls: str) -> dict:
    """Each of ``url`` and ``urls`` contacted holding only ``ca_path``: the refusals, by URL."""
    from cluster.errors import CertificateUntrusted

    out = {}
    for target in (url, *urls):
        try:
            ServiceClient(target, timeout_s=10, verify=ca_path).get("/v1/health")
            out[target] = "connected"
        except CertificateUntrusted as exc:
            out[target] = f"refused: {exc}"
    return out


def capability(url: str, max_jobs: str = "20") -> dict:
    return {"capability": request_capability(url, Hotkey.from_uri(USER_URI), max_jobs=int(max_jobs), ttl_s=3600)}


def _ray_env(cap: str) -> dict:
    """Ray's CLI and SDK with the user's capability as the token: the Jobs gateway takes it (and
    sends Ray the real token, which the user never holds)."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cap}


def hello(url: str, cap: str) -> dict:
    """The peer's hello world with stock ``ray job submit`` against validator-core's Jobs gateway."""
    env_vars = {"RAYHORDE_VALIDATOR_URL": url, "RAYHORDE_CAPABILITY": cap,
                "RAYHORDE_CA_BUNDLE": os.environ["RAYHORDE_CA_BUNDLE"]}
    with tempfile.TemporaryDirectory(prefix="hello-") as work:
        (Path(work) / "hello.py").write_bytes(example_path("hello.py").read_bytes())
        t0 = time.monotonic()
        out = subprocess.run([RAY, "job", "submit", "--address", url, "--verify", os.environ["RAYHORDE_CA_BUNDLE"],
                              "--working-dir", work, "--runtime-env-json", json.dumps({"env_vars": env_vars}),
                              "--", "python", "hello.py"], env=_ray_env(cap), capture_output=True, text=True,
                             timeout=400, cwd=work)
    return {"rc": out.returncode, "stdout": out.stdout[-4000:], "stderr": out.stderr[-2000:],
            "elapsed_s": time.monotonic() - t0}


def submit(url: str, cap: str, sleep_s: str, count: str = "1") -> dict:
    """``count`` organic jobs that each sleep ``sleep_s``, as ``rayhorde job run`` starts them: each
    registered with validator-core, then driven by its own driver submitted through the Jobs
    gateway with only the job's id and scope (no waiting for the drivers)."""
    from ray.job_submission import JobSubmissionClient

    ca = os.environ["RAYHORDE_CA_BUNDLE"]
    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {cap}"}, verify=ca)
    user = ServiceClient(url, headers={"Authorization": f"Bearer {cap}"}, verify=ca)
    spec = {"image": "rayhorde/busybox:local", "command": ["sh", "-c", f"sleep {sleep_s}; echo slept"],
            "executor_class": "always_on.test", "execution_timeout_s": 110, "max_wait_s": 300}
    ids = [user.post("/v1/jobs", spec)["job_id"] for _ in range(int(count))]
    subs = [client.submit_job(entrypoint=f"python -m jobs {job_id} 600", runtime_env={"env_vars": {
        "RAYHORDE_VALIDATOR_URL": url, "RAYHORDE_CA_BUNDLE": ca,
        "RAYHORDE_CAPABILITY": user.post(f"/v1/jobs/{job_id}/scope", {})["scope"]}}) for job_id in ids]
    return {"drivers": subs, "jobs": ids}


def llm(url: str, cap: str, executor_class: str, calls: str = "3") -> dict:
    """An LLM stream: deploy, wait ready, answers through the miner's proxy with the official
    ``openai`` client (every receipt verified by the client's transport)."""
    from serve_apps import SigningKey, StreamSpec, Streams

    key = SigningKey()
    streams = Streams(url, cap)
    t0 = time.monotonic()
    job = streams.deploy(StreamSpec(app="llm", version="1", client_keys=[key.public], executor_class=executor_class))
    ready = job.wait_ready(timeout_s=900)
    ready_s = time.monotonic() - t0
    client = job.openai(key)
    model = client.models.list().data[0].id
    texts = []
    for i in range(int(calls)):
        kwargs = dict(model=model, max_tokens=10, temperature=0, messages=[{"role": "user", "content": f"Count to {i + 3}."}])
        if i % 2:
            texts.append("".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                stream=True, **kwargs) if c.choices))
        else:
            texts.append(client.chat.completions.create(**kwargs).choices[0].message.content)
    receipts = [{"seq": r.seq, "request_id": r.request_id} for r in job.log.by_seq.values()]
    return {"job_id": job.job_id, "proxy_url": ready.proxy_url, "miner": job.view.miner_hotkey, "texts": texts,
            "receipts": receipts, "ready_s": ready_s}


def terminate(url: str, cap: str, job_id: str) -> dict:
    from serve_apps import Streams

    streams = Streams(url, cap)
    return {"status": streams.get(job_id).terminate().status.value}


def echo_volume(url: str, cap: str, executor_class: str, name: str, content: str) -> dict:
    """An echo stream with a file sent into its volume through the miner's proxy and read back
    by the app (which asks its agent, signed by its job key); the stream stays open."""
    from serve_apps import SigningKey, StreamSpec, Streams

    key = SigningKey()
    job = Streams(url, cap).deploy(StreamSpec(app="echo", version="1", client_keys=[key.public],
                                              executor_class=executor_class))
    job.wait_ready(timeout_s=180)
    job.put_file(key, name, content.encode())
    read = json.loads(job.call(key, "/volume", json.dumps({"name": name}).encode()).content)
    return {"job_id": job.job_id, "miner": job.view.miner_hotkey, "read": read["content"]}


def entrypoint(url: str, cap: str, script: str, *args: str) -> dict:
    """Stock ``ray job submit`` through the Jobs gateway running ``python -c script args``; the
    entrypoint's last stdout line that is JSON (``ray job submit`` tails the logs)."""
    out = subprocess.run([RAY, "job", "submit", "--address", url, "--verify", os.environ["RAYHORDE_CA_BUNDLE"],
                          "--", "python", "-c", script, *args], env=_ray_env(cap), capture_output=True, text=True,
                         timeout=300)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return {"rc": out.returncode, "answer": json.loads(lines[-1]) if lines else None,
            "stdout": out.stdout[-3000:], "stderr": out.stderr[-2000:]}


def echo_bench(url: str, cap: str, requests: str, concurrency: str) -> dict:
    """Latency and throughput of the echo app through the miner's proxy, from this host."""
    from serve_apps import SigningKey, StreamSpec, Streams

    key = SigningKey()
    streams = Streams(url, cap)
    job = streams.deploy(StreamSpec(app="echo", version="1", client_keys=[key.public]))
    job.wait_ready(timeout_s=180)
    job.call(key, "/echo", b"warm")
    lat = []
    for _ in range(int(requests)):
        t0 = time.perf_counter()
        job.call(key, "/echo", b'{"hello": "bench"}')
        lat.append(time.perf_counter() - t0)
    n, c = int(requests), int(concurrency)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        list(pool.map(lambda _: job.call(key, "/echo", b"x" * 64), range(n)))
    tput = n / (time.perf_counter() - t0)
    job.terminate()
    return {"p50_s": statistics.median(lat), "tput_rps": tput, "miner": job.view.miner_hotkey}


STEPS = {f.__name__: f for f in (health, untrusted, capability, hello, submit, llm, terminate, echo_bench,
                                 echo_volume, entrypoint)}

if __name__ == "__main__":
    step, url, *args = sys.argv[1:]
    print(json.dumps(STEPS[step](url, *args)), flush=True)
