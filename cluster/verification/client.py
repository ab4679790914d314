"""Running one verification batch on the private verification cluster, from outside it.

Why a subprocess (``python -m cluster.verification.actors run-batch``) and not ``ray.init`` in
the caller: a process can be the driver of one Ray cluster only, and Ray reads
``RAY_AUTH_TOKEN`` / ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` from its environment, process-wide;
the caller (validator-core, or a pytest process already connected to the public cluster) must
not mix them. Ray Client (``ray://``) would need the client server and the same process-wide
token. The subprocess gets ``ray_env(token)`` (an allow-listed environment) and exchanges only
JSON files with the caller.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cluster.fabric import ray_node
from cluster.verification.models import Claim, Verdict


class BatchResult:
    """What one verification batch returned: verdicts plus where and how fast it ran."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.verdicts = [Verdict.model_validate(v) for v in raw["verdicts"]]
        self.actor: dict[str, Any] = raw["actor"]
        self.timings: dict[str, float] = raw["timings"]


class VerificationClient:
    """Runs verification batches on the private cluster at ``gcs_address`` from a separate driver
    process (see the module docstring); its files go to ``work_dir``."""

    def __init__(self, gcs_address: str, token: str, *, work_dir: str | Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.gcs_address = gcs_address
        self.token = token
        self.work_dir = Path(work_dir)
        self.extra_env = dict(extra_env or {})

    def run_batch(self, claims: list[Claim], margin: float, factory: str,
                  factory_kwargs: dict[str, Any] | None = None, *, timeout_s: float = 900,
                  scale_up_timeout_s: float = 300, verify_timeout_s: float = 600,
                  num_gpus: float = 0, keep_warm_s: float = 0) -> BatchResult:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{int(time.time() * 1000)}-{secrets.token_hex(3)}"
        claims_path = self.work_dir / f"claims-{tag}.json"
        out_path = self.work_dir / f"verdicts-{tag}.json"
        log_path = self.work_dir / f"driver-{tag}.log"
        claims_path.write_text(json.dumps([c.model_dump(mode="json") for c in claims]))
        cmd = [sys.executable, "-m", "cluster.verification.actors", "run-batch",
               f"--address={self.gcs_address}", f"--claims={claims_path}", f"--out={out_path}",
               f"--margin={margin}", f"--factory={factory}",
               f"--factory-kwargs={json.dumps(factory_kwargs or {})}",
               f"--scale-up-timeout-s={scale_up_timeout_s}", f"--verify-timeout-s={verify_timeout_s}",
               f"--num-gpus={num_gpus}", f"--keep-warm-s={keep_warm_s}"]
        env = {**ray_node.ray_env(self.token), "PYTHONPATH": ray_node.python_path(), **self.extra_env}
        with open(log_path, "ab", buffering=0) as log:
            proc = subprocess.Popen(cmd, env=env, cwd=str(self.work_dir), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            ray_node.stop_process(proc)
            raise TimeoutError(f"verification driver timed out after {timeout_s:.0f}s: {_tail(log_path)}")
        finally:
            claims_path.unlink(missing_ok=True)
        if rc != 0 or not out_path.exists():
            raise RuntimeError(f"verification driver failed (rc={rc}): {_tail(log_path)}")
        raw = json.loads(out_path.read_text())
        out_path.unlink()
        return BatchResult(raw)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""
