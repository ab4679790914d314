"""``rayhorde``: the local stack (up / down / status / demo), capabilities and organic jobs."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click

from cluster.cli import streams as stream_cli
from cluster.protocol.identity import load_or_create_wallet
from cluster.devstack.local_stack import LocalStack
from cluster.settings import default_home
from cluster.protocol.user import request_capability
from cluster.errors import RayhordeError
from cluster.protocol.jobs import JobView

HELLO_COMMAND = 'echo "Hello, $NAME!" | tee -a /artifacts/stuff'


def _home(home: str | None) -> Path:
    return Path(home) if home else default_home() / "local"


def _stack_state(home: Path) -> dict:
    path = home / "stack.json"
    if not path.exists():
        raise click.ClickException(f"no local stack recorded in {home}; run `rayhorde up` first")
    return json.loads(path.read_text())


home_option = click.option("--home", default=None, help="state directory (default $RAYHORDE_HOME/local)")


class _Group(click.Group):
    """Turns rayhorde's own errors into one clean line (exit 2) instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RayhordeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group)
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


@main.command()
@home_option
@click.option("--validator", "validator_url", default=None, help="validator-core URL (default: the local stack's)")
@click.option("--closed", default=3, show_default=True, help="how many closed cycles to show")
def scores(home: str | None, validator_url: str | None, closed: int) -> None:
    """Show the running scoring cycle and the last closed ones (executor-seconds, weights)."""
    import httpx
    url = validator_url or _stack_state(_home(home))["validator_url"]
    resp = httpx.get(f"{url}/v1/scores", params={"closed": closed}, timeout=10)
    if resp.status_code != 200:
        raise click.ClickException(f"validator-core answered {resp.status_code}: {resp.text[:300]}")
    body = resp.json()
    for c in [body["current"], *body["closed"]]:
        head = "running" if c["partial"] else f"closed, weights {c['chain_status']}"
        click.echo(f"cycle {c['cycle']} ({head}; {body['cycle_s']:g} s)")
        for m in c["miners"]:
            weight = c["weights"].get(str(m["uid"]), 0) if m["uid"] is not None else "-"
            void = "  VOIDED (failed verification)" if m["stream_voided"] else ""
            click.echo(f"  uid {m['uid']!s:>4}  {m['hotkey'][:12]}...  score {m['score']:9.1f} s  organic "
                       f"{m['organic_jobs']} jobs {m['organic_executor_s']:.1f} s  streams {m['stream_executor_s']:.1f} s "
                       f"{m['stream_answers']} answers  weight {weight}{void}")
        if not c["miners"]:
            click.echo("  no scored work")


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
    view = run_job(state, spec, wallet=wallet, wallet_uri=wallet_uri, progress=sys.stderr.isatty())
    print_view(view)
    if view.status.value != "completed":
        sys.exit(1)


def run_job(state: dict, spec: dict, *, wallet: str = "user", wallet_uri: str | None = "//Dave",
            timeout_s: float = 300, progress: bool = False) -> JobView:
    """Submit a driver with ``ray job submit`` semantics (Jobs REST API) and read the result from validator-core."""
    from ray.job_submission import JobSubmissionClient

    cap = _user_capability(state, wallet, wallet_uri, max_jobs=1, ttl_s=600)
    token = Path(state["token_path"]).read_text().strip()
    client = JobSubmissionClient(state["dashboard_url"], headers={"Authorization": f"Bearer {token}"})
    sub = client.submit_job(entrypoint=f"python -m jobs {shlex.quote(json.dumps(spec))} {int(timeout_s)}",
                            runtime_env={"env_vars": {"RAYHORDE_VALIDATOR_URL": state["validator_url"],
                                                      "RAYHORDE_CAPABILITY": cap}})
    deadline = time.monotonic() + timeout_s
    job_id = None
    while job_id is None:  # the driver prints the job id as soon as validator-core accepted it
        ids = [ln.split("=", 1)[1].strip() for ln in client.get_job_logs(sub).splitlines()
               if ln.startswith("RAYHORDE_JOB_ID=")]
        if ids:
            job_id = ids[0]
        elif client.get_job_status(sub).is_terminal() or time.monotonic() > deadline:
            raise click.ClickException(f"driver {sub} did not register a job; its output:\n"
                                       f"{client.get_job_logs(sub)[-2000:]}")
        else:
            time.sleep(0.2)
    return follow_job(state["validator_url"], cap, job_id, timeout_s=deadline - time.monotonic(), progress=progress)


def follow_job(validator_url: str, cap: str, job_id: str, *, timeout_s: float, progress: bool) -> JobView:
    """Long-poll the job until it is final; with ``progress``, keep one live status line."""
    from cluster.protocol.http import ServiceClient

    client = ServiceClient(validator_url, headers={"Authorization": f"Bearer {cap}"})
    t0 = time.monotonic()
    while True:
        view = JobView.model_validate(client.get(f"/v1/jobs/{job_id}", params={"wait_s": 1}, timeout=35))
        if progress:
            last = view.history[-1] if view.history else None
            line = (f"[{time.monotonic() - t0:6.1f} s] {view.status.value:<15} attempt {view.attempt} "
                    f"{(view.miner_hotkey or '')[:12]} {last.detail[:60] if last else ''}")
            click.echo("\r" + line.ljust(110), nl=False, err=True)
        if view.status.terminal or time.monotonic() - t0 > timeout_s:
            if progress:
                click.echo("", err=True)
            return view


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


def _reader(home: str | None, wallet: str, wallet_uri: str):
    from cluster.protocol.http import ServiceClient
    state = _stack_state(_home(home))
    cap = _user_capability(state, wallet, wallet_uri, max_jobs=1, ttl_s=600)
    return state, cap, ServiceClient(state["validator_url"], headers={"Authorization": f"Bearer {cap}"})


@job.command("status")
@home_option
@_with(user_options)
@click.argument("job_id")
def job_status(home: str | None, wallet: str, wallet_uri: str, job_id: str) -> None:
    """Show a job: status, miner, failure, full history, artifacts."""
    _, _, client = _reader(home, wallet, wallet_uri)
    print_view(JobView.model_validate(client.get(f"/v1/jobs/{job_id}")))


@job.command("logs")
@home_option
@_with(user_options)
@click.option("--follow", is_flag=True, help="wait for the job to finish, with a live progress line")
@click.argument("job_id")
def job_logs(home: str | None, wallet: str, wallet_uri: str, follow: bool, job_id: str) -> None:
    """Print a job's stdout and stderr (once it has finished)."""
    state, cap, client = _reader(home, wallet, wallet_uri)
    view = (follow_job(state["validator_url"], cap, job_id, timeout_s=86400, progress=True) if follow
            else JobView.model_validate(client.get(f"/v1/jobs/{job_id}")))
    if view.result is None:
        raise click.ClickException(f"job {job_id} is {view.status.value}: no logs yet (try --follow)")
    click.echo(view.result.stdout, nl=False)
    click.echo(view.result.stderr, nl=False, err=True)


@job.command("list")
@home_option
@_with(user_options)
def job_list(home: str | None, wallet: str, wallet_uri: str) -> None:
    """List this user's most recent jobs."""
    _, _, client = _reader(home, wallet, wallet_uri)
    for raw in client.get("/v1/jobs"):
        v = JobView.model_validate(raw)
        click.echo(f"{v.job_id}  {v.status.value:<13} attempt {v.attempt}  {v.executor_class:<16} "
                   f"{v.miner_hotkey or '-'}")


@job.command("cancel")
@home_option
@_with(user_options)
@click.argument("job_id")
def job_cancel(home: str | None, wallet: str, wallet_uri: str, job_id: str) -> None:
    """Cancel a job: it ends `cancelled` and its container is killed."""
    _, _, client = _reader(home, wallet, wallet_uri)
    view = JobView.model_validate(client.post(f"/v1/jobs/{job_id}/cancel"))
    click.echo(f"job {view.job_id}: {view.status.value}")


stream_cli.register(main, home_option=home_option, user_options=user_options, with_options=_with,
                    stack_state=_stack_state, home_dir=_home, capability=_user_capability)


@main.command("verify-proof")
@click.argument("proof_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--model-dir", default=None, help="the whitelisted model folder (default: built from its source)")
@click.option("--no-rescore", is_flag=True, help="check signatures and hashes only, not the model's side")
def verify_proof(proof_path: str, model_dir: str | None, no_rescore: bool) -> None:
    """Check an exported verification proof: every signature, every hash, and (with the model)
    that re-scoring the answer gives the same verdict. Exit 0 only if all of it holds."""
    from cluster.verification.proof import ProofInvalid, check_proof, rescorer

    raw = Path(proof_path).read_bytes()
    try:
        proof = check_proof(raw, rescore=None if no_rescore else rescorer(model_dir))
    except ProofInvalid as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    v = proof.verdict
    where = f" at position {v.position}" if v.position is not None else ""
    click.echo(f"proof verified: request {v.request_id[:16]}... of job {v.job_id} by miner {v.miner_hotkey}: "
               f"{'ok' if v.ok else v.reason}{where} (margin {proof.margin:g}, weights {proof.weights_sha256[:16]}..., "
               f"signed by validator {proof.validator}){'' if no_rescore else '; re-scored with the model'}")


@main.command()
@home_option
def demo(home: str | None) -> None:
    """up -> the peer's hello-world job -> examples/hello.py via `ray job submit` -> down -> leftovers check."""
    from cluster.cli.demo import run_demo
    sys.exit(run_demo(_home(home)))


def cli_entry() -> None:
    main()


if __name__ == "__main__":
    cli_entry()
