"""``rayhorde stream deploy|call|status|terminate``: streaming jobs from the command line.

``deploy`` makes a fresh client key for the job (kept 0600 under ``<home>/stream-keys/``),
asks validator-core for the app, waits for the miner-signed readiness and prints the job's base
URL. ``call`` signs one request with that key, verifies the answer's receipt (signatures, both
hashes, chain, clock) and prints the answer on stdout, the receipt's check on stderr.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import click

from cluster.cli.common import home_dir, home_option, stack_state, user_capability, user_options, with_options
from cluster.protocol.jobs import JobStatus
from cluster.protocol.keys import SigningKey
from cluster.protocol.streams import StreamSpec
from serve_apps.api import Streams


def _keys_dir(state: dict) -> Path:
    d = Path(state["home"]) / "stream-keys"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _save_key(state: dict, job_id: str, seed_hex: str) -> Path:
    path = _keys_dir(state) / f"{job_id}.key"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(seed_hex)
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def _load_key(state: dict, job_id: str) -> SigningKey:
    path = _keys_dir(state) / f"{job_id}.key"
    if not path.exists():
        raise click.ClickException(f"no client key for streaming job {job_id} in {path.parent}; only the shell "
                                   "that deployed it (same --home) can call it")
    return SigningKey(path.read_text().strip())


@click.group()
def stream() -> None:
    """Streaming jobs: whitelisted Serve apps behind a miner's proxy, every answer signed."""


def _streams(home: str | None, wallet: str, wallet_uri: str) -> tuple[dict, Streams]:
    state = stack_state(home_dir(home))
    cap = user_capability(state, wallet, wallet_uri, max_jobs=10, ttl_s=3600)
    return state, Streams(state["validator_url"], cap)


@stream.command("deploy")
@home_option
@with_options(user_options)
@click.option("--app", default="echo", show_default=True)
@click.option("--version", "version", default="1", show_default=True)
@click.option("--executor-class", default="always_on.test", show_default=True)
@click.option("--max-duration-s", default=3600, show_default=True)
@click.option("--option", "options", multiple=True, help="NAME=JSON-VALUE app option, repeatable")
@click.option("--ready-timeout-s", default=300, show_default=True)
def deploy(home, wallet, wallet_uri, app, version, executor_class, max_duration_s, options, ready_timeout_s):
    """Deploy APP on a miner and wait until it is ready."""
    state, streams = _streams(home, wallet, wallet_uri)
    seed = secrets.token_hex(32)
    key = SigningKey(seed)
    opts = {k: json.loads(v) for k, v in (o.split("=", 1) for o in options)}
    job = streams.deploy(StreamSpec(app=app, version=version, executor_class=executor_class,
                                    client_keys=[key.public], max_duration_s=max_duration_s, options=opts))
    path = _save_key(state, job.job_id, seed)
    click.echo(f"stream {job.job_id}: placed on miner {job.view.miner_hotkey}; waiting for readiness",
               err=True)
    ready = job.wait_ready(timeout_s=ready_timeout_s)
    click.echo(f"stream {job.job_id}")
    click.echo(f"  status    {job.view.status.value}")
    click.echo(f"  miner     {job.view.miner_hotkey}")
    click.echo(f"  job key   {ready.job_key.scheme}:{ready.job_key.public}")
    click.echo(f"  base url  {job.base_url}")
    click.echo(f"  key file  {path}")


@stream.command("call")
@home_option
@with_options(user_options)
@click.option("--data", default="{}", show_default=True, help="request body; @FILE reads a file")
@click.option("--method", default="POST", show_default=True)
@click.argument("job_id")
@click.argument("path")
def call(home, wallet, wallet_uri, data, method, job_id, path):
    """Send one signed request to PATH under the job's route; verify and print the answer."""
    state, streams = _streams(home, wallet, wallet_uri)
    key = _load_key(state, job_id)
    body = Path(data[1:]).read_bytes() if data.startswith("@") else data.encode()
    job = streams.get(job_id)
    answer = job.call(key, "/" + path.lstrip("/"), body, method=method)
    sys.stdout.buffer.write(answer.content)
    sys.stdout.buffer.flush()
    if answer.receipt is None:
        raise click.ClickException(f"the job answered {answer.status_code} (no receipt)")
    click.echo(f"\nreceipt verified: seq {answer.receipt.seq}, miner {answer.receipt.miner_hotkey}, "
               f"{(answer.receipt.t_to - answer.receipt.t_from) / 1e6:.1f} ms in the job", err=True)


@stream.command("status")
@home_option
@with_options(user_options)
@click.argument("job_id")
def status(home, wallet, wallet_uri, job_id):
    """Show a streaming job and its history."""
    _, streams = _streams(home, wallet, wallet_uri)
    view = streams.get(job_id).view
    click.echo(f"stream {view.job_id}: {view.status.value} ({view.app} {view.version}) on {view.miner_hotkey}")
    if view.failure:
        click.echo(f"  failure   {view.failure.reason}: {view.failure.message}")
    for e in view.history:
        click.echo(f"  history   {e.status.value:<15} {e.detail}".rstrip())


@stream.command("terminate")
@home_option
@with_options(user_options)
@click.argument("job_id")
def terminate(home, wallet, wallet_uri, job_id):
    """End a streaming job now."""
    _, streams = _streams(home, wallet, wallet_uri)
    view = streams.get(job_id).terminate()
    click.echo(f"stream {view.job_id}: {view.status.value}")
    if view.status != JobStatus.completed:
        sys.exit(1)
