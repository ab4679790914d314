"""``rayhorde job run|status|logs|list|cancel``: organic jobs from the command line, and the
helpers the demo shares (:func:`run_job`, :func:`follow_job`, :func:`print_view`).

``job run`` registers the job with validator-core, submits its driver through Ray's Jobs REST
API as ``ray job submit`` does (the driver holds a scope that follows that one job: never the
spec, the capability or the user's hotkey), then reads the job from validator-core, never from
the driver's output.
"""

from __future__ import annotations

import os
import sys
import time

import click

from cluster.cli.common import home_dir, home_option, stack_state, user_capability, user_options, with_options
from cluster.protocol.http import CA_BUNDLE_ENV, ServiceClient
from cluster.protocol.jobs import CAPABILITY_ENV, VALIDATOR_URL_ENV, JobView, Submitted


@click.group()
def job() -> None:
    """Organic jobs."""


@job.command("run", context_settings={"ignore_unknown_options": True})
@home_option
@with_options(user_options)
@click.option("--image", default="rayhorde/busybox:local", show_default=True)
@click.option("--env", "env", multiple=True, help="NAME=VALUE, repeatable")
@click.option("--executor-class", default="always_on.test", show_default=True)
@click.option("--timeout-s", default=60, show_default=True, help="execution limit")
@click.argument("command", nargs=-1, required=True)
def job_run(home: str | None, wallet: str, wallet_uri: str, image: str, env: tuple[str, ...], executor_class: str,
            timeout_s: int, command: tuple[str, ...]) -> None:
    """Run COMMAND in IMAGE on a miner, through a Ray driver, and print the result."""
    state = stack_state(home_dir(home))
    spec = {"image": image, "command": list(command), "env": dict(e.split("=", 1) for e in env),
            "executor_class": executor_class, "execution_timeout_s": timeout_s}
    view = run_job(state, spec, wallet=wallet, wallet_uri=wallet_uri, progress=sys.stderr.isatty())
    print_view(view)
    if view.status.value != "completed":
        sys.exit(1)


def run_job(state: dict, spec: dict, *, wallet: str = "user", wallet_uri: str | None = "//Dave",
            timeout_s: float = 300, progress: bool = False) -> JobView:
    """Register the job with validator-core, then start its driver with ``ray job submit``
    semantics (Jobs REST API, through validator-core's gateway); read the result from validator-core.

    The spec goes to validator-core only: Ray's job table, which every cluster member reads, gets
    the job's id and a scope that follows that one job, not the spec (registry passwords, tokens,
    presigned URLs) and not the capability."""
    from ray.job_submission import JobSubmissionClient  # imports Ray: only the commands that submit pay for it

    cap = user_capability(state, wallet, wallet_uri, max_jobs=1, ttl_s=600)
    ca_bundle = os.environ.get(CA_BUNDLE_ENV) or None
    user = ServiceClient(state["validator_url"], headers={"Authorization": f"Bearer {cap}"}, verify=ca_bundle)
    job_id = Submitted.model_validate(user.post("/v1/jobs", spec)).job_id
    scope = user.post(f"/v1/jobs/{job_id}/scope", {})["scope"]
    # through validator-core's Jobs gateway: the capability is the token (users never hold Ray's)
    client = JobSubmissionClient(state["validator_url"], headers={"Authorization": f"Bearer {cap}"},
                                 verify=ca_bundle or True)
    env = {VALIDATOR_URL_ENV: state["validator_url"], CAPABILITY_ENV: scope}
    if ca_bundle:  # the driver verifies validator-core as this command does
        env[CA_BUNDLE_ENV] = ca_bundle
    driver = client.submit_job(entrypoint=f"python -m jobs {job_id} {int(timeout_s)}", runtime_env={"env_vars": env})

    def driver_failed() -> str | None:
        status = client.get_job_status(driver)
        if status.is_terminal() and status.value != "SUCCEEDED":
            return f"driver {driver} ended {status.value}; its output:\n{client.get_job_logs(driver)[-2000:]}"
        return None

    view = follow_job(state["validator_url"], cap, job_id, timeout_s=timeout_s, progress=progress,
                      driver_failed=driver_failed)
    if not view.status.terminal:
        user.post(f"/v1/jobs/{job_id}/cancel", {})
        raise click.ClickException(f"job {job_id} did not finish in {timeout_s:g} s; cancelled")
    return view


def follow_job(validator_url: str, cap: str, job_id: str, *, timeout_s: float, progress: bool,
               driver_failed=None) -> JobView:
    """Long-poll the job until it is final; with ``progress``, keep one live status line.
    ``driver_failed()``, if given, names why the job's driver ended early (the job is then
    cancelled: nothing would launch its task)."""
    client = ServiceClient(validator_url, headers={"Authorization": f"Bearer {cap}"},
                           verify=os.environ.get(CA_BUNDLE_ENV) or None)
    t0 = time.monotonic()
    while True:
        why = driver_failed() if driver_failed is not None else None
        if why:
            client.post(f"/v1/jobs/{job_id}/cancel", {})
            raise click.ClickException(f"job {job_id} cancelled: {why}")
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


def _reader(home: str | None, wallet: str, wallet_uri: str) -> tuple[dict, str, ServiceClient]:
    state = stack_state(home_dir(home))
    cap = user_capability(state, wallet, wallet_uri, max_jobs=1, ttl_s=600)
    return state, cap, ServiceClient(state["validator_url"], headers={"Authorization": f"Bearer {cap}"})


@job.command("status")
@home_option
@with_options(user_options)
@click.argument("job_id")
def job_status(home: str | None, wallet: str, wallet_uri: str, job_id: str) -> None:
    """Show a job: status, miner, failure, full history, artifacts."""
    _, _, client = _reader(home, wallet, wallet_uri)
    print_view(JobView.model_validate(client.get(f"/v1/jobs/{job_id}")))


@job.command("logs")
@home_option
@with_options(user_options)
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
@with_options(user_options)
def job_list(home: str | None, wallet: str, wallet_uri: str) -> None:
    """List this user's most recent jobs."""
    _, _, client = _reader(home, wallet, wallet_uri)
    for raw in client.get("/v1/jobs"):
        v = JobView.model_validate(raw)
        click.echo(f"{v.job_id}  {v.status.value:<13} attempt {v.attempt}  {v.executor_class:<16} "
                   f"{v.miner_hotkey or '-'}")


@job.command("cancel")
@home_option
@with_options(user_options)
@click.argument("job_id")
def job_cancel(home: str | None, wallet: str, wallet_uri: str, job_id: str) -> None:
    """Cancel a job: it ends `cancelled` and its container is killed."""
    _, _, client = _reader(home, wallet, wallet_uri)
    view = JobView.model_validate(client.post(f"/v1/jobs/{job_id}/cancel"))
    click.echo(f"job {view.job_id}: {view.status.value}")
