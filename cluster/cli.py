"""``rayhorde``: the local stack (up / down / status / demo), capabilities and organic jobs."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import click

from cluster._private.identity import load_or_create_wallet
from cluster._private.local_stack import LocalStack
from cluster._private.settings import default_home
from cluster._private.user import get_job, request_capability
from cluster.errors import RayhordeError
from jobs._private.models import JobView

HELLO_COMMAND = 'echo "Hello, $NAME!" | tee -a /artifacts/stuff'


def _home(home: str | None) -> Path:
    return Path(home) if home else default_home() / "local"


def _stack_state(home: Path) -> dict:
    path = home / "stack.json"
    if not path.exists():
        raise click.ClickException(f"no local stack recorded in {home}; run `rayhorde up` first")
    return json.loads(path.read_text())


home_option = click.option("--home", default=None, help="state directory (default $RAYHORDE_HOME/local)")


@click.group()
def main() -> None:
    """rayhorde: a decentralised compute market on Ray."""


@main.command()
@home_option
@click.option("--miners", default=2, show_default=True)
@click.option("--executors", default=2, show_default=True, help="always_on.test executors per miner")
def up(home: str | None, miners: int, executors: int) -> None:
    """Start validator-core, the Ray head and MINERS miner agents on 127.0.0.1."""
    t0 = time.monotonic()
    state = LocalStack(_home(home), miners=miners, executors_per_miner=executors).up()
    click.echo(f"local stack up in {time.monotonic() - t0:.1f} s")
    _print_state(state)


def _print_state(state: dict) -> None:
    click.echo(f"  validator-core  {state['validator_url']}")
    click.echo(f"  ray dashboard   {state['dashboard_url']}   (token in {state['token_path']})")
    click.echo(f"  ray gcs         {state['gcs_address']}")
    for name, pid in state.get("pids", {}).items():
        click.echo(f"  {name:<15} pid {pid}")


@main.command()
@home_option
def down(home: str | None) -> None:
    """Stop everything `up` started (by PID), containers included."""
    stopped = LocalStack(_home(home)).down()
    click.echo("stopped: " + (", ".join(stopped) or "nothing was running"))


@main.command()
@home_option
def status(home: str | None) -> None:
    """Show the admitted miners and job counts."""
    import httpx
    state = _stack_state(_home(home))
    st = httpx.get(f"{state['validator_url']}/v1/status", timeout=10).json()
    click.echo(f"validator {st['validator']}  gcs {st['gcs_address']}  jobs {st['jobs']}")
    for m in st["miners"]:
        click.echo(f"  miner {m['hotkey']}  node {str(m['node_id'])[:12]}  executors {m['executor_classes']}  "
                   f"busy {m['busy_executors']}  done {m['jobs_done']}  heartbeat {m['heartbeat_age_s']} s ago")


def _user_capability(state: dict, wallet: str, uri: str | None, max_jobs: int, ttl_s: int) -> str:
    hotkey = load_or_create_wallet(Path(state["home"]) / "wallets", wallet, uri=uri)
    return request_capability(state["validator_url"], hotkey, max_jobs=max_jobs, ttl_s=ttl_s)


user_options = [
    click.option("--wallet", default="user", show_default=True, help="the user's wallet name"),
    click.option("--wallet-uri", default="//Dave", show_default=True, help="dev URI used if the wallet is new"),
]


def _with(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


@main.command()
@home_option
@_with(user_options)
@click.option("--max-jobs", default=10, show_default=True)
@click.option("--ttl-s", default=600, show_default=True)
def capability(home: str | None, wallet: str, wallet_uri: str, max_jobs: int, ttl_s: int) -> None:
    """Print a capability for driver scripts (signed request with the user's hotkey)."""
    click.echo(_user_capability(_stack_state(_home(home)), wallet, wallet_uri, max_jobs, ttl_s))


@main.group()
def job() -> None:
    """Organic jobs."""


@job.command("run", context_settings={"ignore_unknown_options": True})
@home_option
@_with(user_options)
@click.option("--image", default="rayhorde/busybox:local", show_default=True)
@click.option("--env", "env", multiple=True, help="NAME=VALUE, repeatable")
@click.option("--executor-class", default="always_on.test", show_default=True)
@click.option("--timeout-s", default=60, show_default=True, help="execution limit")
@click.argument("command", nargs=-1, required=True)
def job_run(home: str | None, wallet: str, wallet_uri: str, image: str, env: tuple[str, ...], executor_class: str,
            timeout_s: int, command: tuple[str, ...]) -> None:
    """Run COMMAND in IMAGE on a miner, through a Ray driver, and print the result."""
    state = _stack_state(_home(home))
    spec = {"image": image, "command": list(command), "env": dict(e.split("=", 1) for e in env),
            "executor_class": executor_class, "execution_timeout_s": timeout_s}
    view = run_job(state, spec, wallet=wallet, wallet_uri=wallet_uri)
    print_view(view)
    if view.status.value != "completed":
        sys.exit(1)


def run_job(state: dict, spec: dict, *, wallet: str = "user", wallet_uri: str | None = "//Dave",
            timeout_s: float = 300) -> JobView:
    """Submit a driver with ``ray job submit`` semantics (Jobs REST API) and read the result from validator-core."""
    from ray.job_submission import JobStatus as RayJobStatus
    from ray.job_submission import JobSubmissionClient

    cap = _user_capability(state, wallet, wallet_uri, max_jobs=1, ttl_s=600)
    token = Path(state["token_path"]).read_text().strip()
    client = JobSubmissionClient(state["dashboard_url"], headers={"Authorization": f"Bearer {token}"})
    sub = client.submit_job(entrypoint=f"python -m jobs {shlex.quote(json.dumps(spec))} {int(timeout_s)}",
                            runtime_env={"env_vars": {"RAYHORDE_VALIDATOR_URL": state["validator_url"],
                                                      "RAYHORDE_CAPABILITY": cap}})
    deadline = time.monotonic() + timeout_s
    while client.get_job_status(sub) not in (RayJobStatus.SUCCEEDED, RayJobStatus.FAILED, RayJobStatus.STOPPED):
        if time.monotonic() > deadline:
            raise click.ClickException(f"driver {sub} still running after {timeout_s:.0f} s")
        time.sleep(0.2)
    logs = client.get_job_logs(sub)
    ids = [line.split("=", 1)[1].strip() for line in logs.splitlines() if line.startswith("RAYHORDE_JOB_ID=")]
    if not ids:
        raise click.ClickException(f"driver {sub} did not register a job; its output:\n{logs[-2000:]}")
    return get_job(state["validator_url"], cap, ids[0])


def print_view(view: JobView) -> None:
    click.echo(f"job {view.job_id}")
    click.echo(f"  status    {view.status.value}")
    click.echo(f"  miner     {view.miner_hotkey} (attempt {view.attempt})")
    if view.failure:
        f = view.failure
        click.echo(f"  failure   {f.kind.value}: {f.reason} at stage {f.stage}, exit {f.exit_code} — {f.message}")
    for e in view.history:
        click.echo(f"  history   attempt {e.attempt} {e.status.value:<15} {e.detail}".rstrip())
    if view.result:
        for path in sorted(view.result.artifacts):
            click.echo(f"  artifact  {path} = {view.artifact(path).decode(errors='replace')!r}")
        if view.result.stdout:
            click.echo(f"  stdout    {view.result.stdout!r}")


@main.command()
@home_option
def demo(home: str | None) -> None:
    """up -> the peer's hello-world job -> examples/hello.py via `ray job submit` -> down -> leftovers check."""
    from cluster._private.demo import run_demo
    sys.exit(run_demo(_home(home)))


def cli_entry() -> None:
    try:
        main(standalone_mode=True)
    except RayhordeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    cli_entry()
