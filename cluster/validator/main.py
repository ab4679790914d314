"""Run validator-core: ``python -m cluster.validator.main --config configs/validator.local.toml``.

With ``--head`` (what ``rayhorde validator run`` passes) it is the whole validator role on its
host: it first starts the public Ray head on ``ray_node_ip`` (dashboard, Jobs API and Serve REST
on 127.0.0.1 only; no Ray Client server), then validator-core on ``host:port`` (HTTPS when
``tls_cert_path`` and ``tls_key_path`` are set), and stops the head when validator-core stops.
Without it, the head is someone else's (the one-machine dev stack starts its own).
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from cluster.chain import LocalChain
from cluster.errors import ConfigError
from cluster.fabric import ray_node
from cluster.fabric.ports import HeadPorts
from cluster.protocol.identity import load_wallet, read_or_create_secret
from cluster.settings import ValidatorSettings, add_wallet_args, load_settings, wallet_overrides
from cluster.validator.app import build_app
from cluster.validator.core import ValidatorCore

log = logging.getLogger("rayhorde.validator")


def build_core(settings: ValidatorSettings) -> ValidatorCore:
    settings.home.mkdir(parents=True, exist_ok=True)
    hotkey = load_wallet(settings.wallet_path, settings.wallet_name, settings.wallet_hotkey)
    chain = LocalChain(settings.metagraph_path, weights_path=settings.resolved_weights_path(), setter=hotkey.ss58)
    return ValidatorCore(settings, hotkey=hotkey, chain=chain,
                         ray_token=read_or_create_secret(settings.token_path()))


def check_tls(settings: ValidatorSettings) -> dict[str, str]:
    """uvicorn's TLS arguments, or none; half a pair or a missing file is a ConfigError."""
    cert, key = settings.tls_cert_path, settings.tls_key_path
    if cert is None and key is None:
        return {}
    if cert is None or key is None:
        raise ConfigError("set both tls_cert_path and tls_key_path to serve HTTPS, or neither")
    for path in (cert, key):
        if not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist: fix tls_cert_path / tls_key_path")
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}


def start_head(settings: ValidatorSettings, token: str):
    """The validator's public Ray head, on ``ray_node_ip`` with every port from ``ray_port_base``."""
    ports = HeadPorts.from_base(settings.ray_port_base)
    temp_dir = str(settings.ray_temp_dir or ray_node.short_tmp(settings.home, "head"))
    # Jobs drivers run on the head and call validator-core back trusting this bundle
    shown = [str(settings.ca_bundle_path)] if settings.ca_bundle_path else []
    head = ray_node.start_head(ports=ports, temp_dir=temp_dir, token=token, node_ip=settings.ray_node_ip,
                               num_cpus=settings.head_num_cpus, object_store_mb=settings.head_object_store_mb,
                               log_path=str(settings.home / "logs" / "ray-head.log"),
                               sandbox_spec=ray_node.node_sandbox(settings.ray_user, temp_dir, read_only=shown))
    try:
        ray_node.wait_head_ready(ports, token, timeout_s=120)
    except BaseException:
        ray_node.stop_process(head)
        raise
    log.info("Ray head up on %s (pid %d; dashboard %s, loopback only)", settings.gcs_address(), head.pid,
             ports.dashboard_url)
    return head


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None)
    ap.add_argument("--head", action="store_true", help="also start (and stop) the validator's Ray head")
    add_wallet_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s validator-core %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat and receipt page
    try:
        settings = load_settings(ValidatorSettings, args.config, env_prefix="RAYHORDE_VALIDATOR_",
                                 **wallet_overrides(args))
        tls = check_tls(settings)
        core = build_core(settings)
    except ConfigError as exc:  # one line: what is wrong and how to fix it
        sys.exit(f"validator-core: {exc}")
    token = read_or_create_secret(settings.token_path())
    try:
        head = start_head(settings, token) if args.head else None
    except ConfigError as exc:  # e.g. ray_user unknown, or set while not root
        sys.exit(f"validator-core: {exc}")
    try:
        core.start()
        log.info("validator %s on %s (db %s)", core.hotkey.ss58, settings.url, settings.resolved_db_url())
        app = build_app(core, jobs_dashboard_url=settings.dashboard_url(), ray_token=token)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                    **tls)
    finally:
        core.stop()
        if head is not None:
            ray_node.stop_process(head)


if __name__ == "__main__":
    main()
