"""The validator's private verification cluster: a Ray head whose autoscaler adds 80 GB GPU
workers (``gpu80`` node type, custom resource ``gpu80gb``) for verification actors and removes
them once idle.

Trust: this cluster is private to the validator; no miner ever joins it (it runs the verifier
that judges miners, so a miner on it could see or sway the judging). Its token lives only in
validator-core and in the verification driver it starts, so that driver may be a Ray driver of
THIS cluster (unlike the public one, whose results validator-core never unpickles).

How it is started (Ray 2.60.0, measured on a 2-core box):
* ``ray start --head --block --autoscaling-config=<rendered verification.yaml>``, every port of
  the head explicit (``ports.HeadPorts``), token auth on (``ray_node.ray_env``),
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` so everything stays on 127.0.0.1, its own short temp
  dir. ``ray.cluster_utils.AutoscalingCluster`` is not used: it runs ``ray stop --force``.
* Locally the provider is Ray's ``FakeMultiNodeProvider`` (``RAY_FAKE_CLUSTER=1``,
  ``AUTOSCALER_UPDATE_INTERVAL_S=1``): the autoscaler (the head's ``monitor.py`` process) starts
  each "node" (raylet + agents) itself with the head's environment, working directory and temp
  dir. The provider gives those nodes random free ports (it hard-codes ``0`` for them), still on
  127.0.0.1; no fixed default port is ever taken.
* The head advertises 0 ``gpu80gb``: a verifier can only land on an autoscaled worker.

Teardown (``stop``) never uses ``ray stop`` (it kills every Ray process on the host) nor names:
fake nodes outlive the monitor that started them (they are not kernel-fate-shared: the provider
passes ``spawn_reaper=False``) and rename themselves (``ray::IDLE``, ``ray::VerifierActor``...),
so a process is ours when it is the head or one of its descendants, or when its working
directory, command line or an open file lies under this cluster's temp dir (every fake node uses
the head's temp dir and inherits its cwd ``<temp_dir>/cwd``): ``processes.find_by_folder``.
Every such process is recorded (pid + start time, so a reused pid is never signalled) with its
listening ports, in ``<home>/verification-cluster.json``, at start, on each ``workers()`` call and
before stopping. ``stop`` first SIGTERMs the head's ``ray start`` (it tears its own node down,
monitor included, so nothing re-creates a node), then SIGTERM / SIGKILL every other recorded
process (fake nodes' raylets ignore SIGTERM once the GCS is gone), rescanning the temp dir until
none is left. ``stop_recorded(state_file)`` does the same from the record alone, after a crash.
Measured here (2 cores): head ready ~5 s, scale-up (actor requested -> its constructor runs)
~3-7 s, scale-down (actor killed -> worker gone) ~4 s with a 3 s idle timeout, stop ~3-5 s.

Batches run through :class:`~cluster.verification.client.VerificationClient` (``client()``).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from cluster.fabric import processes as ptable
from cluster.fabric import ray_node
from cluster.fabric.ports import HeadPorts, find_free_port_base, ports_listened_by
from cluster.resources import config_path
from cluster.verification.client import VerificationClient

CUSTOM_RESOURCE = "gpu80gb"
WORKER_TYPE = "gpu80"
HEAD_TYPE = "ray.head.default"
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
# The head's ``ray start`` tears its node down in order on SIGTERM; after this it gets SIGKILL.
HEAD_STOP_S = 30


class VerificationCluster:
    """Start / inspect / stop the private verification cluster.

    ``home`` holds the rendered autoscaler config, the head's log and the PID record; Ray's own
    files go to a short temp dir under /tmp (unix socket paths are limited to 107 bytes).
    """

    def __init__(self, home: str | Path, *, config: str | Path | None = None, token: str | None = None,
                 port_base: int | None = None, name: str = "verif", idle_timeout_minutes: float | None = None,
                 max_workers: int | None = None, object_store_mb: int = 100,
                 extra_env: dict[str, str] | None = None, keep_temp: bool = False) -> None:
        self.home = Path(home).resolve()
        self.config_path = Path(config or config_path("verification.yaml"))
        self.token = token or secrets.token_hex(24)
        # Below 32768: Linux' ephemeral range starts there, so outgoing connections can't take them.
        self.ports = HeadPorts.from_base(port_base or find_free_port_base(hi=32768))
        self.temp_dir = ray_node.short_tmp(self.home, name)
        self.idle_timeout_minutes = idle_timeout_minutes
        self.max_workers = max_workers
        self.object_store_mb = object_store_mb
        self.extra_env = dict(extra_env or {})
        self.keep_temp = keep_temp
        self.state_file = self.home / "verification-cluster.json"
        self.rendered_config = self.home / "verification.autoscaler.yaml"
        self.log_path = self.home / "logs" / "verification-head.log"
        self.head: subprocess.Popen | None = None
        self._pids: dict[int, float] = {}  # pid -> start time (guards against pid reuse)
        self._ports: set[int] = set()  # every port a recorded process was seen listening on
        self.config: dict[str, Any] = {}

    # ------------------------------------------------------------------ addresses
    @property
    def gcs_address(self) -> str:
        return self.ports.gcs_address

    @property
    def dashboard_url(self) -> str:
        return self.ports.dashboard_url

    @property
    def cwd(self) -> str:
        """The head's working directory, inherited by the monitor, every fake node and worker."""
        return os.path.join(self.temp_dir, "cwd")

    @property
    def idle_timeout_s(self) -> float:
        return float(self.config.get("idle_timeout_minutes", 0)) * 60

    @property
    def recorded_pids(self) -> dict[int, float]:
        return dict(self._pids)

    @property
    def recorded_ports(self) -> set[int]:
        return set(self._ports)

    # ------------------------------------------------------------------ config
    def render_config(self) -> dict[str, Any]:
        """The shipped ``verification.yaml`` (or ``config``) with this cluster's GCS address (and overrides)."""
        cfg = yaml.safe_load(self.config_path.read_text())
        cfg["provider"]["gcs_address"] = self.gcs_address
        if self.idle_timeout_minutes is not None:
            cfg["idle_timeout_minutes"] = self.idle_timeout_minutes
        if self.max_workers is not None:
            cfg["max_workers"] = self.max_workers
            cfg["available_node_types"][WORKER_TYPE]["max_workers"] = self.max_workers
        head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
        if head.get(CUSTOM_RESOURCE):
            raise ValueError(f"the head must not advertise {CUSTOM_RESOURCE}")
        return cfg

    def _head_cmd(self, head_resources: dict[str, Any]) -> list[str]:
        res = {k: v for k, v in head_resources.items() if k not in ("CPU", "GPU", "object_store_memory")}
        return ray_node.head_command(self.ports, temp_dir=self.temp_dir, num_cpus=int(head_resources.get("CPU", 1)),
                                     num_gpus=int(head_resources.get("GPU", 0)), resources=res,
                                     object_store_mb=self.object_store_mb,
                                     autoscaling_config=str(self.rendered_config))

    # ------------------------------------------------------------------ start
    def start(self, timeout_s: float = 90) -> "VerificationCluster":
        if self.head is not None:
            raise RuntimeError("already started")
        if self.state_file.exists() and json.loads(self.state_file.read_text()).get("pids"):
            raise RuntimeError(f"a verification cluster is recorded in {self.state_file}; stop it first "
                               f"(VerificationCluster.stop_recorded)")
        if os.path.exists(self.temp_dir):
            raise RuntimeError(f"{self.temp_dir} exists: another verification cluster uses this home")
        self.config = self.render_config()
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        self.rendered_config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        head_res = self.config["available_node_types"][self.config["head_node_type"]]["resources"]
        env = {
            **ray_node.head_env(self.token, self.temp_dir),
            # Fake nodes and their workers inherit this environment: actors and verifier
            # factories ("module:callable") import rayhorde modules by name.
            "PYTHONPATH": ray_node.python_path(),
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            **self.extra_env,
        }
        self._save()
        try:
            self.head = ray_node.spawn(self._head_cmd(head_res), env, str(self.log_path), self.cwd)
            self._record([self.head.pid])
            self._wait_ready(timeout_s)
            self.record()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the dashboard answers (with the token), the head node is registered and the
        autoscaler (monitor) has completed one update; fails fast if the head exits."""
        deadline, last = time.monotonic() + timeout_s, None
        while True:
            if self.head is None or self.head.poll() is not None:
                raise RuntimeError(f"verification head exited: {self.log_tail()}")
            try:
                if any(n["is_head_node"] for n in self.nodes()):
                    status = self.autoscaler_status()
                    if status.get("autoscalingError"):
                        raise RuntimeError(f"autoscaler error: {status['autoscalingError']}")
                    if status.get("autoscalingStatus"):
                        return
                    last = "autoscaler has not reported yet"
                else:
                    last = "head node not registered"
            except (urllib.error.URLError, OSError, ValueError, KeyError) as e:  # not up yet
                last = repr(e)
            if time.monotonic() > deadline:
                raise TimeoutError(f"verification cluster not ready after {timeout_s:.0f}s ({last}); "
                                   f"{self.log_tail(1500)}")
            time.sleep(0.25)

    def autoscaler_status(self) -> dict[str, Any]:
        """The dashboard's ``/api/cluster_status``: ``autoscalingStatus`` (the ``ray status``
        text), ``autoscalingError``, ``clusterStatus`` (the autoscaler's last report)."""
        return self._get("/api/cluster_status").get("data", {})

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ inspect
    def _get(self, path: str, timeout_s: float = 10) -> Any:
        req = urllib.request.Request(f"{self.dashboard_url}{path}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def nodes(self, include_dead: bool = False) -> list[dict[str, Any]]:
        """Alive (or all) nodes, from the State API over HTTP with the token: this process
        need not be a Ray driver (it may be one of another cluster). A dead node keeps its
        ``resources_total``."""
        body = self._get("/api/v0/nodes?limit=1000&detail=true")
        if not body.get("result", False):
            raise RuntimeError(f"state API error: {body.get('msg')}")
        return [n for n in body["data"]["result"]["result"] if include_dead or n.get("state") == "ALIVE"]

    def workers(self) -> list[dict[str, Any]]:
        """Alive worker nodes that advertise the custom resource (never the head)."""
        out = [n for n in self.nodes()
               if not n["is_head_node"] and (n.get("resources_total") or {}).get(CUSTOM_RESOURCE, 0) > 0]
        self.record()
        return out

    def head_node_id(self) -> str:
        return next(n["node_id"] for n in self.nodes() if n["is_head_node"])

    def wait_workers(self, count: int, timeout_s: float, poll_s: float = 0.5) -> list[dict[str, Any]]:
        """Poll ``workers()`` until exactly ``count`` are alive (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ws = self.workers()
            if len(ws) == count:
                return ws
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ws)} verification workers after {timeout_s:.0f}s, wanted {count}")
            time.sleep(poll_s)

    # ------------------------------------------------------------------ processes
    def processes(self) -> dict[int, float]:
        """Live processes of this cluster right now: pid -> start time (see module docstring)."""
        roots = [self.head.pid] if self.head is not None and self.head.poll() is None else []
        return ptable.find_by_folder(self.temp_dir, roots)

    def _record(self, pids: list[int] | None = None) -> None:
        for pid in pids or ():
            row = ptable.look(pid)
            if row is not None:
                self._pids[pid] = row.started
        self._save()

    def record(self) -> dict[int, float]:
        """Add every live process of this cluster (and the ports it listens on) to the record."""
        found = self.processes()
        self._pids.update(found)
        self._ports.update(ports_listened_by(found))
        self._save()
        return found

    def _save(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        state = {"temp_dir": self.temp_dir, "gcs_address": self.gcs_address,
                 "dashboard_url": self.dashboard_url, "head_pid": self.head.pid if self.head else None,
                 "pids": {str(p): s for p, s in self._pids.items()}, "ports": sorted(self._ports)}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    # ------------------------------------------------------------------ stop
    def stop(self, timeout_s: float = HEAD_STOP_S) -> list[int]:
        """Stop the head, then every other recorded or found process of this cluster, by PID.

        Returns the pids that were signalled. Safe to call twice."""
        if self.head is not None or self._pids:
            self.record()
        signalled = list(self._pids)
        if self.head is not None and self.head.poll() is None:
            _stop_head(self.head, timeout_s)
        _kill_recorded(self._pids, self.temp_dir)
        if not self.keep_temp and os.path.isdir(self.temp_dir):
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self._pids.clear()
        self._save()
        return signalled

    @staticmethod
    def stop_recorded(state_file: str | Path) -> list[int]:
        """Stop what a (crashed) VerificationCluster recorded in ``state_file``."""
        state = json.loads(Path(state_file).read_text())
        pids = {int(p): s for p, s in state.get("pids", {}).items()}
        signalled = list(pids)
        head = state.get("head_pid")
        if head and int(head) in pids and ptable.alive(int(head), pids[int(head)]):
            _stop_head(int(head), HEAD_STOP_S, start=pids[int(head)])
        _kill_recorded(pids, state["temp_dir"])
        # the next cluster of this home uses the same temp dir and refuses to start beside another
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
        state["pids"] = {}
        Path(state_file).write_text(json.dumps(state, indent=2))
        return signalled

    def client(self, work_dir: str | Path | None = None) -> "VerificationClient":
        return VerificationClient(self.gcs_address, self.token,
                                  work_dir=work_dir or self.home / "driver", extra_env=self.extra_env)

    def __enter__(self) -> "VerificationCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_head(head: subprocess.Popen | int, timeout_s: float, start: float | None = None) -> None:
    """SIGTERM ``ray start --head --block`` and wait for IT to exit: it tears down its own node
    (GCS, raylet, monitor, dashboard) in order. Not ``ray_node.stop_process``: that waits for
    the whole process group, and the autoscaler's fake nodes are in it too; without a GCS
    their raylets wait ~30 s to reconnect, so they are killed afterwards by ``_kill_recorded``
    (after the monitor is gone, so nothing re-creates them)."""
    ptable.stop_one(head, timeout_s, start)


def _kill_recorded(pids: dict[int, float], temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every recorded process still alive, then rescan ``temp_dir`` for
    late ones (a raylet may start a worker meanwhile) until none is left.

    The grace is short on purpose: it runs after the head is gone, and a fake node's raylet and
    runtime-env agent ignore SIGTERM for >10 s without a GCS (measured); the dashboard's
    forkserver children and drivers exit on SIGTERM within ~0.1-3 s."""
    ptable.kill_recorded(pids, lambda: ptable.find_by_folder(temp_dir), grace_s=1.5)
