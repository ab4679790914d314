"""``rayhorde demo`` (what ``make demo`` runs): a local validator and two miners run the peer
system's hello-world job, a failing job, and ``examples/hello.py`` through the real
``ray job submit`` CLI, then two streaming jobs (the echo app; the LLM app through the
``openai`` client), every answer's receipt verified; then validator-core verifies the LLM's
answers on its private, autoscaled verification cluster (one prefill pass each), exports a
proof that another process re-scores, and shows the cycle's scores; then everything is shut
down and checked to be gone.

Nothing here reads the checkout: ``examples/hello.py`` and the miner config come from
:mod:`cluster.resources` (package data in an installed wheel), and ``ray job submit`` uploads a
temporary working dir holding only the example.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import docker
import psutil

from cluster.cli.common import user_capability
from cluster.cli.jobs import print_view, run_job
from cluster.devstack.local_stack import LocalStack
from cluster.fabric.ports import listening_sockets
from cluster.fabric.processes import process_tree
from cluster.resources import config_path, example_path, package_root
from cluster.settings import MinerSettings, load_settings

HELLO = 'echo "Hello, $NAME!" | tee -a /artifacts/stuff'


def ray_job_submit(state: dict, capability: str, example: str) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir <tmp> -- python <example>`` through validator-core's Jobs
    gateway, with the user's capability as the token (the user never holds the Ray token); the
    example shipped with rayhorde copied alone into a temporary working dir (the driver imports
    ``jobs`` from the Ray node's own path, as a user's driver would)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": capability}
    with tempfile.TemporaryDirectory(prefix="rayhorde-demo-") as work:
        shutil.copy(example_path(example), Path(work) / example)
        cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", state["validator_url"],
               "--working-dir", work, "--", "python", example]  # the gateway hands the driver its scope and URL
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=work)


def _streaming_step(state: dict, cap: str) -> bool:
    from serve_apps import SigningKey, StreamSpec, Streams

    key = SigningKey()
    streams = Streams(state["validator_url"], cap)
    t0 = time.monotonic()
    job = streams.deploy(StreamSpec(app="echo", version="1", client_keys=[key.public]))
    ready = job.wait_ready(timeout_s=120)
    click.echo(f"  stream    {job.job_id} on miner {job.view.miner_hotkey} ready in {time.monotonic() - t0:.1f} s")
    click.echo(f"  readiness job key {ready.job_key.public[:16]}..., proxy {ready.proxy_url} (signed by the miner)")
    buffered = job.call(key, "/echo", b'{"hello": "stream"}')
    streamed = job.call(key, "/echo?stream=1", b"0123456789" * 10)
    for name, a in (("buffered", buffered), ("streamed", streamed)):
        r = a.receipt
        click.echo(f"  {name:<9} {a.content[:48]!r}... receipt seq {r.seq} verified: job + miner signatures, "
                   f"input/output sha256, chain, clock ({(r.t_to - r.t_from) / 1e6:.1f} ms in the job)")
    job.put_file(key, "notes.txt", b"sent through the miner\n")
    seen = job.call(key, "/volume", b'{"name": "notes.txt"}')
    click.echo(f"  volume    the job reads back {json.loads(seen.content)['content']!r}")
    end = job.terminate()
    click.echo(f"  terminate {end.status.value}")
    streams.close()
    return (buffered.receipt is not None and streamed.receipt is not None and streamed.receipt.seq == buffered.receipt.seq + 1
            and end.status.value == "completed")


def _llm_step(state: dict, cap: str):
    from serve_apps import SigningKey, StreamSpec, Streams

    key = SigningKey()
    streams = Streams(state["validator_url"], cap)
    t0 = time.monotonic()
    job = streams.deploy(StreamSpec(app="llm", version="1", client_keys=[key.public]))
    ready = job.wait_ready(timeout_s=600)
    click.echo(f"  stream    {job.job_id} ready in {time.monotonic() - t0:.1f} s, weights {ready.weights_sha256[:16]}... "
               "(the whitelisted digest)")
    llm = job.openai(key)
    model = llm.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the capital of France? One word."}]
    t0 = time.monotonic()
    chunks = list(llm.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16,
                                              stream=True))
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    ids = [t for c in chunks for ch in c.choices for t in (ch.model_extra or {}).get("token_ids", [])]
    click.echo(f"  streamed  {text!r} ({len(ids)} tokens in {time.monotonic() - t0:.1f} s); receipt verified")
    sampled = llm.chat.completions.create(model=model, messages=messages, temperature=0.8, max_tokens=16)
    click.echo(f"  sampled   {sampled.choices[0].message.content!r} (T=0.8, keyed by the signed request); "
               "receipt verified")
    receipts = len(job.log.by_seq)
    click.echo(f"  receipts  {receipts} verified and chained (models list, streamed, sampled)")
    return job, streams, cap, receipts == 3 and bool(text)


def _verification_step(state: dict, home: Path, job, streams, cap: str) -> bool:
    """validator-core pulls the LLM job's receipts and bodies from the miner's proxy, samples them
    (fraction 1 here), and verifies the two chat answers on its private cluster."""
    import httpx

    ids = [job.log.by_seq[seq].request_id for seq in (1, 2)]  # seq 0 is the model list (not scored)
    t0 = time.monotonic()
    proofs: dict[str, bytes] = {}
    while len(proofs) < len(ids) and time.monotonic() - t0 < 600:
        for rid in ids:
            r = httpx.get(f"{state['validator_url']}/v1/streams/{job.job_id}/verdicts/{rid}/proof",
                          headers={"Authorization": f"Bearer {cap}"}, timeout=30)
            if r.status_code == 200:
                proofs[rid] = r.content
        time.sleep(1)
    ok = len(proofs) == len(ids)
    for rid, raw in proofs.items():
        v = json.loads(raw)["verdict"]
        ok &= v["ok"]
        click.echo(f"  verdict   {rid[:12]}... {v['sampler']:<15} {'ok' if v['ok'] else v['reason']}: {v['checked_tokens']} "
                   f"tokens in one prefill pass, margin {v['margin']}, {v['near_ties']} near-ties; by {v['verifier']}")
    click.echo(f"  verified  {len(proofs)}/{len(ids)} answers in {time.monotonic() - t0:.1f} s (an autoscaled gpu80 "
               "worker started for the batch; it goes back to zero when idle)")
    if proofs:
        path = home / "proof.json"
        path.write_bytes(next(iter(proofs.values())))
        t1 = time.monotonic()
        pythonpath = os.pathsep.join(p for p in (str(package_root()), os.environ.get("PYTHONPATH")) if p)
        out = subprocess.run([sys.executable, "-m", "cluster.cli.main", "verify-proof", str(path)], capture_output=True,
                             text=True, timeout=600, cwd=home, env={**os.environ, "PYTHONPATH": pythonpath})
        said = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith(("proof ", "error"))]
        click.echo(f"  proof     another process, the model and {path.name} only ({time.monotonic() - t1:.1f} s): "
                   f"{(said or ['(no answer)'])[-1][:200]}")
        ok &= out.returncode == 0
    scores = httpx.get(f"{state['validator_url']}/v1/scores", timeout=30).json()["current"]
    for m in scores["miners"]:
        click.echo(f"  score     miner {m['hotkey'][:12]}... {m['score']:.1f} executor-s (organic {m['organic_jobs']} "
                   f"jobs, streams {m['stream_executor_s']:.1f} s / {m['stream_answers']} answers) -> weight "
                   f"{scores['weights'].get(str(m['uid']), 0)} of 65535 when the cycle closes")
    job.terminate()
    streams.close()
    return ok


def run_demo(home: Path) -> int:
    stack = LocalStack(home, miners=2, executors_per_miner=2, verification=True, validator_env={
        "RAYHORDE_VALIDATOR_VERIFY_FRACTION": "1", "RAYHORDE_VALIDATOR_VERIFY_BATCH_MIN": "2",
        "RAYHORDE_VALIDATOR_VERIFY_INTERVAL_S": "1"})  # every LLM answer checked, two make a batch
    if stack.state_file.exists():
        click.echo(f"stopping a stack left in {home}: {stack.down()}")
    t0 = time.monotonic()
    state = stack.up()
    click.echo(f"== local stack up in {time.monotonic() - t0:.1f} s: validator-core {state['validator_url']}, "
               f"Ray head {state['gcs_address']}, miners {', '.join(n for n in state['pids'] if n.startswith('miner'))}")
    ok = True
    try:
        click.echo("\n== 1. the peer's hello-world job (rayhorde job run)")
        view = run_job(state, {"image": "rayhorde/busybox:local", "command": ["sh", "-c", HELLO],
                               "env": {"NAME": "World"}})
        print_view(view)
        ok &= view.status.value == "completed" and view.artifact("/artifacts/stuff") == b"Hello, World!\n"

        click.echo("\n== 2. a job that exits 3")
        view = run_job(state, {"image": "rayhorde/busybox:local", "command": ["sh", "-c", "exit 3"]})
        print_view(view)
        ok &= view.failure is not None and view.failure.reason == "nonzero_return_code"

        click.echo("\n== 3. ray job submit ... -- python examples/hello.py")
        cap = user_capability(state, "user", "//Dave", max_jobs=1, ttl_s=600)
        done = ray_job_submit(state, cap, "hello.py")
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("job ", "artifact "))]
        click.echo("\n".join(f"  {ln}" for ln in lines) or done.stdout[-2000:] + done.stderr[-2000:])
        ok &= done.returncode == 0 and any("Hello, rayhorde!" in ln for ln in lines)

        click.echo("\n== 4. a streaming job: the echo app on a miner, behind its proxy, every answer signed")
        ok &= _streaming_step(state, user_capability(state, "user", "//Dave", max_jobs=5, ttl_s=600))

        click.echo("\n== 5. the LLM app (vLLM on the miner's node) through the official openai client")
        llm_cap = user_capability(state, "user", "//Dave", max_jobs=5, ttl_s=600)
        job, streams, cap, llm_ok = _llm_step(state, llm_cap)
        ok &= llm_ok

        click.echo("\n== 6. verification: validator-core re-checks the LLM answers on its private cluster")
        ok &= _verification_step(state, home, job, streams, cap)
    except Exception as exc:  # still shut down and report
        click.echo(f"demo step failed: {exc!r}", err=True)
        ok = False
    finally:
        pids = process_tree(list(stack._state().get("pids", {}).values()))
        for m in stack._state().get("miners", {}).values():
            node = Path(m["home"]) / "node.json"
            if node.exists():
                pids |= process_tree([json.loads(node.read_text())["pid"]])
        sockets_before = listening_sockets(pids)
        t1 = time.monotonic()
        stopped = stack.down()
        click.echo(f"\n== shut down {', '.join(stopped)} in {time.monotonic() - t1:.1f} s "
                   f"({len(pids)} processes, {len(sockets_before)} listening sockets while up)")
    time.sleep(0.5)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    engine = docker.DockerClient(base_url=load_settings(MinerSettings, config_path("miner.local.toml"),
                                                       env_prefix="RAYHORDE_MINER_").docker_host)
    containers = engine.containers.list(all=True, filters={"label": "rayhorde.agent"})
    sockets = sockets_before & listening_sockets()
    click.echo(f"   left behind: {len(alive)} processes, {len(containers)} containers, {len(sockets)} listening sockets")
    clean = not alive and not containers and not sockets
    click.echo("\nDEMO " + ("PASSED" if ok and clean else "FAILED"))
    return 0 if ok and clean else 1
