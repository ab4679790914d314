"""Run validator-core: ``python -m cluster.validator.main --config configs/validator.local.toml``."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from cluster.chain import LocalChain
from cluster.errors import ConfigError
from cluster.protocol.identity import load_wallet, read_or_create_secret
from cluster.settings import ValidatorSettings, add_wallet_args, load_settings, wallet_overrides
from cluster.validator.app import build_app
from cluster.validator.core import ValidatorCore


def build_core(settings: ValidatorSettings) -> ValidatorCore:
    settings.home.mkdir(parents=True, exist_ok=True)
    hotkey = load_wallet(settings.wallet_path, settings.wallet_name, settings.wallet_hotkey)
    chain = LocalChain(settings.metagraph_path, weights_path=settings.resolved_weights_path(), setter=hotkey.ss58)
    return ValidatorCore(settings, hotkey=hotkey, chain=chain,
                         ray_token=read_or_create_secret(settings.token_path()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None)
    add_wallet_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s validator-core %(levelname)s %(message)s")
    try:
        settings = load_settings(ValidatorSettings, args.config, env_prefix="RAYHORDE_VALIDATOR_",
                                 **wallet_overrides(args))
        core = build_core(settings)
    except ConfigError as exc:  # one line: what is wrong and how to fix it
        sys.exit(f"validator-core: {exc}")
    core.start()
    logging.info("validator %s on %s (db %s)", core.hotkey.ss58, settings.url, settings.resolved_db_url())
    uvicorn.run(build_app(core), host=settings.host, port=settings.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
