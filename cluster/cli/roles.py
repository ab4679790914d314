"""The roles as commands, one per host: ``rayhorde validator run``, ``rayhorde miner run`` and
``rayhorde miner check``. Each reads a config file (samples: ``configs/validator.prod.toml``,
``configs/miner.prod.toml``), then the environment (``RAYHORDE_VALIDATOR_*`` /
``RAYHORDE_MINER_*``), then bittensor's wallet flags."""

from __future__ import annotations

import sys

import click

from cluster.errors import RayhordeError


def wallet_flags(fn):
    """bittensor's ``--wallet.name / --wallet.hotkey / --wallet.path``, passed through as given."""
    for flag in ("path", "hotkey", "name"):
        fn = click.option(f"--wallet.{flag}", f"wallet_{flag}", default=None,
                          help=f"wallet {flag} (overrides the config's wallet_{flag})")(fn)
    return fn


def _argv(config: str | None, wallet_name: str | None, wallet_hotkey: str | None, wallet_path: str | None) -> list[str]:
    argv = ["--config", config] if config else []
    for flag, value in (("name", wallet_name), ("hotkey", wallet_hotkey), ("path", wallet_path)):
        if value is not None:
            argv += [f"--wallet.{flag}", value]
    return argv


config_option = click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
                             help="the role's TOML config (default: built-in local defaults)")


@click.group()
def validator() -> None:
    """The validator role: validator-core and its public Ray head."""


@validator.command("run")
@config_option
@wallet_flags
def validator_run(config: str | None, wallet_name: str | None, wallet_hotkey: str | None,
                  wallet_path: str | None) -> None:
    """Start the Ray head on ray_node_ip, then validator-core on host:port (until SIGTERM)."""
    from cluster.validator.main import main as run

    run(["--head", *_argv(config, wallet_name, wallet_hotkey, wallet_path)])


@click.group()
def miner() -> None:
    """The miner role: the agent, its Ray node and its streaming proxy."""


@miner.command("run")
@config_option
@wallet_flags
def miner_run(config: str | None, wallet_name: str | None, wallet_hotkey: str | None, wallet_path: str | None) -> None:
    """Join the validator (signed admission), start the Ray node and the proxy, serve until SIGTERM."""
    from cluster.miner.main import main as run

    sys.exit(run(_argv(config, wallet_name, wallet_hotkey, wallet_path)))


@miner.command("check")
@config_option
@wallet_flags
def miner_check(config: str | None, wallet_name: str | None, wallet_hotkey: str | None,
                wallet_path: str | None) -> None:
    """Preflight: every check a miner host must pass, each named; exit 1 if any fails."""
    from cluster.miner.preflight import run_checks
    from cluster.settings import MinerSettings, load_settings

    try:
        settings = load_settings(MinerSettings, config, env_prefix="RAYHORDE_MINER_", wallet_name=wallet_name,
                                 wallet_hotkey=wallet_hotkey, wallet_path=wallet_path)
    except RayhordeError as exc:
        click.echo(f"FAIL  config: {exc}")
        sys.exit(1)
    checks = run_checks(settings)
    for c in checks:
        click.echo(c.line())
    failed = [c.name for c in checks if not c.ok]
    click.echo(f"{len(checks) - len(failed)} of {len(checks)} checks passed" +
               (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)
