"""The local stack behind ``rayhorde up`` / ``down``: validator-core, the validator's Ray head
and N miner agents (each starting its own Ray worker node), every one a separate process on
127.0.0.1, each in its own session so it can be stopped by its process group.

Everything started is recorded in ``<home>/stack.json`` the moment it starts, so ``down`` (or
a crashed ``up``) stops exactly what was started, by PID, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from cluster.fabric import processes, ray_node
from cluster.fabric.ports import PORT_BLOCK, HeadPorts, find_free_port_base
from cluster.fabric.ray_node import short_tmp
from cluster.protocol.identity import create_dev_wallet, read_or_create_secret
from cluster.resources import config_path
from cluster.settings import ValidatorSettings, load_settings, parse_env_value

DEV_VALIDATOR_URI = "//Alice"
DEV_MINER_URIS = ["//Bob", "//Charlie", "//Eve", "//Ferdie"]


class LocalStack:
    def __init__(self, home: str | Path, *, miners: int = 2, executors_per_miner: int = 2,
                 validator_config: str | Path | None = None, miner_config: str | Path | None = None,
                 validator_env: dict[str, str] | None = None, miner_env: dict[str, str] | None = None,
                 miner_uris: list[str] | None = None,
                 port_base: int | None = None, validator_port: int | None = None, verification: bool = False) -> None:
        self.home = Path(home).resolve()
        self.miners = miners
        self.executors_per_miner = executors_per_miner
        self.validator_config = Path(validator_config or config_path("validator.local.toml"))
        self.miner_config = Path(miner_config or config_path("miner.local.toml"))
        self.validator_env = validator_env or {}
        self.miner_env = miner_env or {}
        self.miner_uris = miner_uris or DEV_MINER_URIS[:miners]
        self.port_base = port_base
        self.validator_port = validator_port
        self.verification = verification  # also start the private, autoscaled verification cluster
        self.state_file = self.home / "stack.json"

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def _save(self, state: dict[str, Any]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def _spawn(self, state: dict[str, Any], name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start ``argv`` with ``os.environ`` + ``env`` (the overrides, recorded for restarts), in
        the stack's home: nothing it does depends on where rayhorde is installed or run from."""
        with open(self.home / "logs" / f"{name}.log", "ab", buffering=0) as log:
            proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.home)
        state.setdefault("pids", {})[name] = proc.pid
        state.setdefault("spawn", {})[name] = {"argv": argv, "env": env}
        self._save(state)
        return proc

    def restart(self, name: str) -> int:
        """Start process ``name`` again as it was first started (after it died or was killed)."""
        state = self._state()
        pid = state["pids"][name]
        if processes.alive(pid):
            raise RuntimeError(f"{name} (pid {pid}) is still running")
        spec = state["spawn"][name]
        return self._spawn(state, name, spec["argv"], spec["env"]).pid

    # ------------------------------------------------------------------ up / down
    def up(self, timeout_s: float = 120) -> dict[str, Any]:
        if self._state().get("pids"):
            raise RuntimeError(f"a stack is already recorded in {self.state_file}; run `rayhorde down` first")
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        base = self.port_base or find_free_port_base(block=PORT_BLOCK * (self.miners + 1))  # head + miners
        vport = self.validator_port or find_free_port_base(block=1)
        venv = {f"RAYHORDE_VALIDATOR_{k.upper()}": str(v) for k, v in {
            "home": self.home / "validator", "wallet_path": self.home / "wallets", "port": vport,
            "ray_port_base": base}.items()}
        venv.update(self.validator_env)
        overrides = {k.removeprefix("RAYHORDE_VALIDATOR_").lower(): parse_env_value(v) for k, v in venv.items()}
        vsettings = load_settings(ValidatorSettings, self.validator_config, env_prefix="__unused__", **overrides)
        # dev wallets, derived from well-known URIs (only here: roles load wallets, never derive them)
        validator = create_dev_wallet(vsettings.wallet_path, vsettings.wallet_name, DEV_VALIDATOR_URI,
                                      vsettings.wallet_hotkey)
        token = read_or_create_secret(vsettings.token_path())
        ports = HeadPorts.from_base(base)
        state: dict[str, Any] = {"home": str(self.home), "validator_url": vsettings.url,
                                 "dashboard_url": ports.dashboard_url, "gcs_address": ports.gcs_address,
                                 "token_path": str(vsettings.token_path()), "miners": {}}
        self._save(state)
        try:
            head = ray_node.start_head(ports=ports, temp_dir=short_tmp(self.home, "head"), token=token, num_cpus=1,
                                       object_store_mb=100, log_path=str(self.home / "logs" / "ray-head.log"))
            state["pids"] = {"ray-head": head.pid}
            self._save(state)
            if self.verification:
                venv.update(self._start_verification(state))
            self._spawn(state, "validator", [sys.executable, "-m", "cluster.validator.main", "--config",
                                             str(self.validator_config)], venv)
            ray_node.wait_head_ready(ports, token, timeout_s=timeout_s)
            _wait_http(f"{vsettings.url}/v1/health", timeout_s)
            for i in range(self.miners):
                name = f"miner{i + 1}"
                mhome = self.home / name
                menv = {f"RAYHORDE_MINER_{k.upper()}": str(v) for k, v in {
                    "name": name, "home": mhome, "wallet_path": self.home / "wallets", "wallet_name": name,
                    "validator_url": vsettings.url, "validator_hotkey": validator.ss58,
                    "executor_classes": json.dumps({"always_on.test": self.executors_per_miner}),
                    "node_port_base": base + PORT_BLOCK * (i + 1),
                    "ray_temp_dir": short_tmp(self.home, name)}.items()}
                menv.update(self.miner_env)
                create_dev_wallet(self.home / "wallets", name, self.miner_uris[i])
                self._spawn(state, name, [sys.executable, "-m", "cluster.miner.main", "--config",
                                          str(self.miner_config)], menv)
                state["miners"][name] = {"home": str(mhome)}
                self._save(state)
            self._wait_miners(vsettings.url, timeout_s)
        except BaseException:
            self.down()
            raise
        return self._state()

    def _start_verification(self, state: dict[str, Any]) -> dict[str, str]:
        """The validator's private verification cluster (no miner ever joins it): its own head,
        token and autoscaler; recorded in its own state file, which ``down`` stops."""
        from cluster.verification.cluster import VerificationCluster

        vc = VerificationCluster(self.home / "verification")
        token_path = self.home / "verification" / "ray_token"
        token_path.parent.mkdir(parents=True, exist_ok=True)
        token_path.write_text(vc.token)
        token_path.chmod(0o600)
        state["verification"] = {"state_file": str(vc.state_file), "gcs_address": vc.gcs_address,
                                 "dashboard_url": vc.dashboard_url, "token_path": str(token_path)}
        self._save(state)
        vc.start()
        return {"RAYHORDE_VALIDATOR_VERIFICATION_ADDRESS": vc.gcs_address,
                "RAYHORDE_VALIDATOR_VERIFICATION_TOKEN_PATH": str(token_path)}

    def _wait_miners(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, pid in self._state().get("pids", {}).items():
                if not processes.alive(pid):
                    raise RuntimeError(f"{name} (pid {pid}) exited during start-up; see {self.home}/logs/{name}.log")
            status = httpx.get(f"{url}/v1/status", timeout=5).json()
            if sum(1 for m in status["miners"] if m["node_id"]) >= self.miners:
                return
            time.sleep(0.3)
        raise TimeoutError(f"miners did not join within {timeout_s:.0f} s; see {self.home}/logs")

    def down(self) -> list[str]:
        """Stop everything recorded, miners first (they stop their own Ray nodes), then
        validator-core, then the head. Returns what was stopped."""
        state = self._state()
        pids: dict[str, int] = state.get("pids", {})
        stopped = []
        order = sorted(pids, key=lambda n: (not n.startswith("miner"), n == "ray-head"))
        for name in order:
            if processes.alive(pids[name]):
                ray_node.stop_process(pids[name])
                stopped.append(name)
        for name, m in state.get("miners", {}).items():  # a node orphaned by a killed agent
            node_file = Path(m["home"]) / "node.json"
            if node_file.exists():
                pid = json.loads(node_file.read_text()).get("pid")
                if pid and processes.alive(pid):
                    ray_node.stop_process(pid)
                    stopped.append(f"{name}-ray-node")
        verification = state.get("verification")
        if verification and Path(verification["state_file"]).exists():
            from cluster.verification.cluster import VerificationCluster

            if VerificationCluster.stop_recorded(verification["state_file"]):
                stopped.append("verification-cluster")
        # Ray temp dirs live under /tmp (short: unix socket paths are limited to 107 bytes), not
        # under home: remove them with what used them
        for name in ["head", *state.get("miners", {})]:
            shutil.rmtree(short_tmp(self.home, name), ignore_errors=True)
        if self.state_file.exists():
            self.state_file.unlink()
        return stopped


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")
