"""Typed settings with local defaults, overridable by a TOML file and then the environment.

Precedence (last wins): model defaults < TOML file < ``RAYHORDE_<ROLE>_<FIELD>`` variables <
explicit keyword overrides. Environment values are parsed as JSON when they look like JSON
(lists, numbers, tables), else taken as strings.

Paths: a relative path written in a TOML file is relative to that file's folder (so a config
folder can be moved as a whole); one from the environment or an override is relative to the
current directory. Path defaults name the configs rayhorde ships (:mod:`cluster.resources`).
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.errors import ConfigError
from cluster.protocol.identity import default_wallet_path
from cluster.protocol.moved import current_module_path
from cluster.resources import config_path


def default_home() -> Path:
    return Path(os.environ.get("RAYHORDE_HOME", Path.home() / ".rayhorde"))


class ExecutorClass(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    description: str = ""
    memory_mb: int = Field(gt=0)
    cpus_milli: int = Field(gt=0)
    pids: int = Field(gt=0)
    gpus: int = Field(ge=0, default=0)
    max_execution_s: int = Field(gt=0)
    tmp_mb: int = Field(gt=0, default=64)
    artifacts_max_bytes: int = Field(gt=0)
    artifact_file_max_bytes: int = Field(gt=0)
    log_max_bytes: int = Field(gt=0)
    output_max_mb: int = Field(gt=0, default=64)  # /output is a tmpfs of this size: a hard cap while writing
    volume_max_download_bytes: int = Field(gt=0, default=256 * 2**20)
    volume_max_unpacked_bytes: int = Field(gt=0, default=512 * 2**20)
    volume_max_files: int = Field(gt=0, default=10_000)
    max_download_s: int = Field(gt=0, default=600)
    max_upload_s: int = Field(gt=0, default=600)
    max_image_pull_s: int = Field(gt=0, default=600)


MODEL_CACHE_ENV = "RAYHORDE_MODEL_CACHE"


def default_model_cache() -> Path:
    """Where the serving apps (and the verifiers) keep built models: ``$RAYHORDE_MODEL_CACHE``,
    else ``~/.cache/rayhorde/models``. A sandboxed node is shown it read-only and told it by name."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "rayhorde" / "models")


def load_executor_classes(path: str | Path) -> dict[str, ExecutorClass]:
    path = Path(path).absolute()
    try:
        raw = tomllib.loads(path.read_text())
        return {name: ExecutorClass.model_validate(body) for name, body in raw["classes"].items()}
    except FileNotFoundError as exc:
        raise ConfigError(f"executor classes file {path} does not exist") from exc
    except (tomllib.TOMLDecodeError, KeyError, ValidationError) as exc:
        raise ConfigError(f"executor classes file {path} is malformed: {exc}") from exc


class ValidatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    netuid: int = 12
    home: Path = Field(default_factory=lambda: default_home() / "validator")
    # the validator's hotkey, bittensor's layout: <wallet_path>/<wallet_name>/hotkeys/<wallet_hotkey>
    wallet_path: Path = Field(default_factory=default_wallet_path)
    wallet_name: str = "validator"
    wallet_hotkey: str = "default"
    host: str = "127.0.0.1"  # validator-core binds here
    port: int = 8750
    public_url: str = ""  # how miners and users reach validator-core; default: http(s)://<host>:<port>
    ray_node_ip: str = "127.0.0.1"  # the Ray head's address: miners' nodes reach its GCS here
    # HTTPS: validator-core serves TLS when given both; the CA bundle verifies miners' proxies
    # (collector, probes); unset: the system's CAs
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    ca_bundle_path: Path | None = None
    db_url: str | None = None  # default: sqlite file under home
    metagraph_path: Path = Field(default_factory=lambda: config_path("metagraph.local.json"))
    executor_classes_path: Path = Field(default_factory=lambda: config_path("executor_classes.toml"))
    users: list[str] = []
    banned_hotkeys: list[str] = []
    # "nftables": only admitted miners' addresses (and loopback) reach the head's Ray ports
    # (cluster/validator/nftables.py; needs CAP_NET_ADMIN); "none": the one-machine dev stack
    firewall: Literal["none", "nftables"] = "none"
    firewall_table: str = Field(default="rayhorde", pattern=r"^[a-z][a-z0-9_]{0,31}$")
    image_allow: list[str] = []  # glob patterns; empty = every image not denied
    image_deny: list[str] = []
    max_clock_skew_s: float = Field(gt=0, default=5)
    ticket_ttl_s: float = Field(gt=0, default=60)
    challenge_ttl_s: float = Field(gt=0, default=30)
    capability_max_ttl_s: float = Field(gt=0, default=3600)
    heartbeat_interval_s: float = Field(gt=0, default=2)
    heartbeat_timeout_s: float = Field(gt=0, default=10)
    deadline_leeway_s: float = Field(ge=0, default=30)
    max_attempts: int = Field(ge=1, default=3)
    incident_penalty_s: float = Field(ge=0, default=600)  # a charged incident lowers a miner's priority this long
    unreachable_free: int = Field(ge=0, default=5)  # work lost to a silent miner is not charged this often per penalty window
    sweep_interval_s: float = Field(gt=0, default=1)
    # What one client can put on validator-core (validator/limits.py): bodies over max_body_bytes are
    # refused (413) before more is read; job specs (inline volumes), job results (artifacts, logs) and
    # the Jobs gateway's working-dir uploads have their own limits. The endpoints anyone may call take
    # public_rate_per_s per address; a capability holds at most long_polls_per_capability long-polls
    # open; heartbeats have heartbeat_threads of their own.
    max_body_bytes: int = Field(gt=0, default=512 * 2**10)
    max_spec_bytes: int = Field(gt=0, default=16 * 2**20)
    max_result_bytes: int = Field(gt=0, default=32 * 2**20)
    max_package_bytes: int = Field(gt=0, default=512 * 2**20)
    public_rate_per_s: float = Field(gt=0, default=5)
    public_burst: int = Field(gt=0, default=20)
    long_polls_per_capability: int = Field(gt=0, default=8)
    heartbeat_threads: int = Field(gt=0, default=4)
    # A node_lost report counts as a fabric incident only if Ray's GCS also declares the node dead
    # within this long (checked every sweep); still ALIVE after it: charged (node_lost_but_alive).
    # Ray's health check declares a killed node dead after 5 failed checks 3 s apart (~15 s): keep above.
    node_lost_confirm_s: float = Field(gt=0, default=30)
    # The watchtower (validator/watchtower.py) reads Ray (State API, GCS) this often and ends impostor
    # nodes and rogue drivers, actors and tasks, charging their miner; 0: no watch.
    watch_interval_s: float = Field(ge=0, default=5)
    ray_port_base: int = 6380
    ray_gcs_address: str | None = None  # default: <ray_node_ip>:<ray_port_base>
    ray_token_path: Path | None = None  # default: <home>/ray_token
    # the head `rayhorde validator run` starts (the dev stack starts its own)
    head_num_cpus: int = Field(ge=0, default=1)
    head_object_store_mb: int = Field(ge=50, default=100)
    ray_temp_dir: Path | None = None  # default /tmp/rh-<hash of home>-head: unix socket paths are limited to 107 bytes
    # The OS user (name, or uid:gid) every Ray process of the head runs as, in a mount namespace that
    # shows only what Ray needs (cluster/fabric/sandbox.py; the role must start as root). Unset: Ray runs
    # as the role's own user, unconfined (the one-machine dev stack). Deployments set it.
    ray_user: str | None = None
    # streaming jobs (Serve apps driven through the head's Serve REST API)
    whitelist_path: Path = Field(default_factory=lambda: config_path("serve_apps.toml"))
    deploy_streams: bool = True  # false: no Ray head to deploy to (unit tests)
    serve_http_port: int | None = None  # default: ray_port_base + 9 (a free slot of the head's port block)
    serve_request_timeout_s: float = Field(gt=0, default=600)  # cluster-wide: above the longest request
    stream_max_duration_s: float = Field(gt=0, default=24 * 3600)
    stream_deploy_timeout_s: float = Field(gt=0, default=300)
    # verification: collect every answer's receipt, verify a sample on the private cluster
    verify_interval_s: float = Field(gt=0, default=5)  # how often answers are pulled from miners' proxies
    verify_fraction: float = Field(ge=0, le=1, default=0.1)  # of collected answers sent to the verifiers
    verify_batch_min: int = Field(gt=0, default=16)  # a GPU start is worth this many answers...
    verify_batch_max_age_s: float = Field(gt=0, default=600)  # ...or an answer this old
    verify_batch_max: int = Field(gt=0, default=64)
    # logprob margin: `python -m benchmarks.detection --honest 200` calibrated 0.625 on answers kept apart
    # (2 x the widest honest top-choice gap over vLLM fp32 and transformers bf16); bf16 alone reaches ~0.22
    verify_margin: float = Field(ge=0, default=0.625)
    # the batch statistic for lower-precision copies (verification.calibration): honest mismatch rate of
    # the verifier configuration (the detection benchmark's "honest p0": 0.0172 for vLLM fp32, 0.0217 for
    # transformers bf16, over fp32 and bf16 honest answers), and the one-sided z of the bound
    verify_batch_honest_rate: float = Field(gt=0, lt=1, default=0.02)
    verify_batch_z: float = Field(gt=0, default=4.0)
    verify_probe_interval_s: float = Field(ge=0, default=600)  # validator-core's own requests per verifiable stream; 0: off
    verify_probe_timeout_s: float = Field(gt=0, default=120)
    verify_keep_warm_s: float = Field(ge=0, default=120)  # the verifier actor waits this long for the next batch
    verify_drain_s: float = Field(ge=0, default=120)  # keep pulling an ended job's receipts this long
    # Receipt collection (validator/verification.py), per stream and pass: pages of collect_page_limit
    # answers, for at most collect_budget_s and collect_max_bytes, whatever the proxy sends; a page it
    # could not finish with the whole budget, or that breaks the protocol, is a charged collection_failed
    # incident (the stream is then not pulled for incident_penalty_s). collect_workers streams are pulled
    # at once. A page of honest answers must fit: a request is at most the miners' stream_request_max_kb
    # (base64 on the page: x 4/3), an LLM answer's SSE body ~250 bytes a token.
    collect_page_limit: int = Field(gt=0, le=1000, default=50)
    collect_budget_s: float = Field(gt=0, default=60)
    collect_max_bytes: int = Field(gt=0, default=256 * 2**20)
    collect_workers: int = Field(gt=0, default=4)
    # A proxy keeps answers in the order they finish, the job numbers them as it signs: under load seq
    # n+1 may be kept a moment before n. A hole is a chain_gap once it has stayed open this long.
    collect_gap_grace_s: float = Field(ge=0, default=30)
    verification_ban_s: float = Field(ge=0, default=3600)  # a failed verification bans the miner this long
    verification_address: str | None = None  # GCS address of the private verification cluster; None: off
    verification_token_path: Path | None = None  # its Ray token (a cluster of its own: not the public one's)
    verifier_factory: str = "cluster.verification.verifier:Verifier"  # module:callable on the worker
    # scoring (validator/scoring.py): executor-seconds per cycle -> u16 weights on the chain
    score_cycle_s: float = Field(gt=0, default=4320)  # one subnet tempo: 360 blocks x 12 s
    weights_path: Path | None = None  # the local chain's weights log; default: <home>/chain-weights.jsonl

    @field_validator("verifier_factory")
    @classmethod
    def _moved(cls, path: str) -> str:
        return current_module_path(path)  # a config written before a module moved still names it

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert_path else "http"
        return self.public_url.rstrip("/") or f"{scheme}://{self.host}:{self.port}"

    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'validator.db'}"

    def resolved_weights_path(self) -> Path:
        return self.weights_path or self.home / "chain-weights.jsonl"

    def gcs_address(self) -> str:
        return self.ray_gcs_address or f"{self.ray_node_ip}:{self.ray_port_base}"

    def token_path(self) -> Path:
        return self.ray_token_path or self.home / "ray_token"

    def resolved_serve_http_port(self) -> int:
        return self.serve_http_port or self.ray_port_base + 9

    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ray_port_base + 1}"  # HeadPorts.from_base(ray_port_base).dashboard


class MinerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = "miner"
    home: Path = Field(default_factory=lambda: default_home() / "miner")
    # the miner's hotkey, bittensor's layout: <wallet_path>/<wallet_name>/hotkeys/<wallet_hotkey>
    wallet_path: Path = Field(default_factory=default_wallet_path)
    wallet_name: str = "miner"
    wallet_hotkey: str = "default"
    validator_url: str = "http://127.0.0.1:8750"
    validator_hotkey: str
    executor_classes: dict[str, int] = {"always_on.test": 1}
    executor_classes_path: Path = Field(default_factory=lambda: config_path("executor_classes.toml"))
    proxy_url: str = ""  # the public address of this miner's streaming proxy (default http(s)://<proxy_host>:<proxy_port>)
    proxy_host: str = "127.0.0.1"  # the proxy binds <proxy_host>:<proxy_port>
    proxy_port: int = 0  # 0: node_port_base + 9
    ray_node_ip: str = "127.0.0.1"  # this miner's Ray node: the validator's head connects back to it here
    # HTTPS: the proxy serves TLS when given both; the CA bundle verifies validator-core; unset: the system's CAs
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    ca_bundle_path: Path | None = None
    stream_idle_timeout_s: float = Field(gt=0, default=10)  # a stream that sends nothing this long is ended
    stream_volume_max_mb: int = Field(gt=0, default=64)  # a file sent to a streaming job
    stream_request_max_kb: int = Field(gt=0, default=1024)  # a request body to a streaming job (413 beyond)
    num_cpus: int = Field(ge=0, default=1)
    object_store_mb: int = Field(ge=50, default=80)
    node_port_base: int = 0  # 0: pick free ports
    ray_temp_dir: Path | None = None  # keep short: unix socket paths are limited to 107 bytes
    # The OS user (name, or uid:gid) of this miner's Ray node, sandboxed (see ValidatorSettings.ray_user):
    # a rival's task pinned to the node then reads no wallet, no docker socket, no job's files.
    ray_user: str | None = None
    max_clock_skew_s: float = Field(gt=0, default=5)
    docker_host: str = "unix:///run/rayhorde-docker.sock"
    image_user: str = "65534:65534"
    # Downloads and uploads to loopback / private addresses are refused unless this is set (a
    # job must not aim the miner at its own agent, the Ray dashboard or a metadata service).
    allow_private_networks: bool = False
    hf_endpoint: str | None = None  # default: $HF_ENDPOINT, else https://huggingface.co


M = TypeVar("M", bound=BaseModel)


def load_settings(model: type[M], path: str | Path | None, *, env_prefix: str, **overrides: Any) -> M:
    """Build ``model`` from defaults, the TOML file at ``path``, the environment and ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path).absolute()
        try:
            data.update(_relative_to(p.parent, model, tomllib.loads(p.read_text())))
        except FileNotFoundError as exc:
            raise ConfigError(f"settings file {p} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"settings file {p} is not valid TOML: {exc}") from exc
    for name in model.model_fields:
        value = os.environ.get(f"{env_prefix}{name.upper()}")
        if value is not None:
            data[name] = parse_env_value(value)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {model.__name__} (from {path or 'defaults'} + environment): {exc}") from exc
    for name, value in settings:
        if isinstance(value, Path) and not value.is_absolute():
            setattr(settings, name, value.absolute())
    return settings


def _relative_to(folder: Path, model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each relative path of a Path-typed field made relative to ``folder``."""
    out = dict(data)
    for name, value in data.items():
        field = model.model_fields.get(name)
        if field is not None and "Path" in str(field.annotation) and isinstance(value, str) and value:
            out[name] = str(folder / value) if not Path(value).is_absolute() else value
    return out


def parse_env_value(value: str) -> Any:
    """An environment variable's value: JSON when it looks like JSON, else the string."""
    if value[:1] in "[{" or value.replace(".", "", 1).isdigit() or value in ("true", "false"):
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def add_wallet_args(ap: argparse.ArgumentParser) -> None:
    """bittensor's wallet flags; each overrides the config's ``wallet_*`` field."""
    ap.add_argument("--wallet.name", dest="wallet_name", default=None, help="wallet name (config: wallet_name)")
    ap.add_argument("--wallet.hotkey", dest="wallet_hotkey", default=None, help="hotkey name (config: wallet_hotkey)")
    ap.add_argument("--wallet.path", dest="wallet_path", default=None,
                    help="folder of wallets (config: wallet_path; default ~/.bittensor/wallets)")


def wallet_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("wallet_name", "wallet_hotkey", "wallet_path")}
