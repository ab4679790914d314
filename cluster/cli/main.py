"""``rayhorde``: the local stack (up / down / status / demo), scores, capabilities, proofs, and
the command groups of :mod:`cluster.cli.jobs` (``job``), :mod:`cluster.cli.streams`
(``stream``) and :mod:`cluster.cli.roles` (``validator``, ``miner``: one role per host). Shared helpers live in :mod:`cluster.cli.common`; this module only assembles."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from cluster.cli.common import (
    ca_bundle_option, home_dir, home_option, stack_state, user_capability, user_options, with_options,
)
from cluster.cli.jobs import job
from cluster.cli.roles import miner, validator
from cluster.cli.streams import stream
from cluster.devstack.local_stack import LocalStack
from cluster.errors import ProofInvalid, RayhordeError
from cluster.protocol.http import ServiceClient


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


main.add_command(job)
main.add_command(stream)
main.add_command(validator)
main.add_command(miner)


@main.command()
@home_option
@click.option("--miners", default=2, show_default=True)
@click.option("--executors", default=2, show_default=True, help="always_on.test executors per miner")
def up(home: str | None, miners: int, executors: int) -> None:
    """Start validator-core, the Ray head and MINERS miner agents on 127.0.0.1."""
    t0 = time.monotonic()
    state = LocalStack(home_dir(home), miners=miners, executors_per_miner=executors).up()
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
    stopped = LocalStack(home_dir(home)).down()
    click.echo("stopped: " + (", ".join(stopped) or "nothing was running"))


@main.command()
@home_option
@ca_bundle_option
def status(home: str | None) -> None:
    """Show the admitted miners and job counts."""
    state = stack_state(home_dir(home))
    st = ServiceClient(state["validator_url"], timeout_s=10).get("/v1/status")
    click.echo(f"validator {st['validator']}  gcs {st['gcs_address']}  jobs {st['jobs']}")
    for m in st["miners"]:
        click.echo(f"  miner {m['hotkey']}  node {str(m['node_id'])[:12]}  executors {m['executor_classes']}  "
                   f"busy {m['busy_executors']}  done {m['jobs_done']}  heartbeat {m['heartbeat_age_s']} s ago")


@main.command()
@home_option
@click.option("--validator", "validator_url", default=None, help="validator-core URL (default: the local stack's)")
@click.option("--closed", default=3, show_default=True, help="how many closed cycles to show")
@ca_bundle_option
def scores(home: str | None, validator_url: str | None, closed: int) -> None:
    """Show the running scoring cycle and the last closed ones (executor-seconds, weights)."""
    url = validator_url or stack_state(home_dir(home))["validator_url"]
    body = ServiceClient(url, timeout_s=10).get("/v1/scores", params={"closed": closed})
    for c in [body["current"], *body["closed"]]:
        head = "running" if c["partial"] else f"closed, weights {c['chain_status']}"
        click.echo(f"cycle {c['cycle']} ({head}; {body['cycle_s']:g} s)")
        for m in c["miners"]:
            weight = c["weights"].get(str(m["uid"]), 0) if m["uid"] is not None else "-"
            failed = " and ".join(what for what in ("verification", "collection") if m.get(f"{what}_failures"))
            void = f"  VOIDED (failed {failed or 'verification'})" if m["stream_voided"] else ""
            click.echo(f"  uid {m['uid']!s:>4}  {m['hotkey'][:12]}...  score {m['score']:9.1f} s  organic "
                       f"{m['organic_jobs']} jobs {m['organic_executor_s']:.1f} s  streams {m['stream_executor_s']:.1f} s "
                       f"{m['stream_answers']} answers  weight {weight}{void}")
        if not c["miners"]:
            click.echo("  no scored work")


@main.command()
@home_option
@with_options(user_options)
@click.option("--max-jobs", default=10, show_default=True)
@click.option("--ttl-s", default=600, show_default=True)
def capability(home: str | None, wallet: str, wallet_uri: str, max_jobs: int, ttl_s: int) -> None:
    """Print a capability for driver scripts (signed request with the user's hotkey)."""
    click.echo(user_capability(stack_state(home_dir(home)), wallet, wallet_uri, max_jobs, ttl_s))


@main.command("verify-proof")
@click.argument("proof_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--model-dir", default=None, help="the whitelisted model folder (default: built from its source)")
@click.option("--no-rescore", is_flag=True, help="check signatures and hashes only, not the model's side")
def verify_proof(proof_path: str, model_dir: str | None, no_rescore: bool) -> None:
    """Check an exported verification proof: every signature, every hash, and (with the model)
    that re-scoring the answer gives the same verdict. Exit 0 only if all of it holds."""
    from cluster.verification.proof import check_proof, rescorer  # the model stack: load on use

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
    from cluster.cli.demo import run_demo  # docker and psutil: only the demo pays for them

    sys.exit(run_demo(home_dir(home)))


def cli_entry() -> None:
    main()


if __name__ == "__main__":
    cli_entry()
