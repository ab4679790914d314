"""What every ``rayhorde`` command module shares: where the local stack keeps its state, the
options every user-facing command takes, and the dev user's capability.

The local stack (``rayhorde up``) records itself in ``<home>/stack.json``; the commands read
validator-core's URL, the Ray dashboard and the token path from there. A user command signs a
capability request with the user's wallet (created from a dev URI the first time) and talks to
validator-core with that capability, as a driver script would. ``--ca-bundle`` (or
``$RAYHORDE_CA_BUNDLE``) is the CA every HTTPS connection of the command must chain to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import click

from cluster.protocol.http import CA_BUNDLE_ENV, tls_verify
from cluster.protocol.identity import create_dev_wallet
from cluster.protocol.user import request_capability
from cluster.settings import default_home


def home_dir(home: str | None) -> Path:
    return Path(home) if home else default_home() / "local"


def stack_state(home: Path) -> dict:
    path = home / "stack.json"
    if not path.exists():
        raise click.ClickException(f"no local stack recorded in {home}; run `rayhorde up` first")
    return json.loads(path.read_text())


home_option = click.option("--home", default=None, help="state directory (default $RAYHORDE_HOME/local)")


def _use_ca_bundle(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # every client of this command (validator-core, proxies, the driver it submits) reads the
    # bundle from the environment: setting it once reaches them all
    if value:
        tls_verify(value)  # a missing or unreadable bundle: one line now, not a traceback later
        os.environ[CA_BUNDLE_ENV] = str(Path(value).expanduser().resolve())


ca_bundle_option = click.option(
    "--ca-bundle", envvar=CA_BUNDLE_ENV, default=None, expose_value=False, is_eager=True, callback=_use_ca_bundle,
    help=f"PEM file of the CA that signed validator-core's and the proxies' certificates (env {CA_BUNDLE_ENV}; "
         "default: the default CAs)")

user_options = [
    click.option("--wallet", default="user", show_default=True, help="the user's wallet name"),
    click.option("--wallet-uri", default="//Dave", show_default=True, help="dev URI used if the wallet is new"),
    ca_bundle_option,
]


def with_options(options: list[Callable]) -> Callable:
    """Apply several click options at once, in the order listed."""
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


def user_capability(state: dict, wallet: str, uri: str, max_jobs: int, ttl_s: int) -> str:
    """A capability for the dev user's wallet (under the stack's home), signed by validator-core."""
    hotkey = create_dev_wallet(Path(state["home"]) / "wallets", wallet, uri)
    return request_capability(state["validator_url"], hotkey, max_jobs=max_jobs, ttl_s=ttl_s)
