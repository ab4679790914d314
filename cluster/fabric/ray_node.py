"""Launching and stopping the Ray processes of rayhorde, each in its own OS process, token auth
on, on 127.0.0.1 (the one-machine dev stack) or on a host's own address (a deployment).

Why (measured with Ray 2.60.0):
* On Linux Ray rewrites 127.0.0.1 to the routable address and listens on all interfaces;
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps a node on loopback, but then ``ray start
  --address`` refuses to join. So every node is this module's entry point (``head`` or
  ``worker``), driving ``ray._private.node.Node`` (what ``ray start`` and
  ``ray.cluster_utils.Cluster.add_node`` drive) in its own process. On a routable address a miner
  could equally join with ``ray start --address=<head>:<gcs port> --node-ip-address=<its address>``
  (measured, DESIGN §8); the entry point adds the node-id file the agent reports.
* ``ray start --head`` always starts the Ray Client server (when its package is installed) on
  the node's address, which is public on a deployed head: the ``head`` entry point starts none.
  The dashboard (Jobs API, Serve REST) binds 127.0.0.1 only.
* Token auth is on by default: every process needs ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``.
  The environment comes from an allow-list: the parent's secrets never reach Ray workers.
* Default ports collide when nodes share a host: every port is explicit (``ports.HeadPorts``).
* ``ray stop`` kills every Ray process on the machine: each launch gets a new session and
  ``stop_process`` signals only what it started.
* Unix socket paths are limited to 107 bytes: keep ``temp_dir`` short (:func:`short_tmp`).
  It is also the node's TMPDIR: the dashboard's forkserver (and vLLM) leave files there.
* Ray workers inherit the raylet's working directory, which is the launcher's: the ``cwd`` given
  here is where tasks run (measured: ``os.getcwd()`` in a task == that directory).
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster.fabric import processes, sandbox
from cluster.fabric.ports import LOOPBACK, HeadPorts
from cluster.resources import package_root

# Variables copied from the parent environment; nothing else is (no secrets leak to workers).
ENV_ALLOW_LIST = ("HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "TMPDIR")


def short_tmp(home: Path, name: str) -> str:
    """A Ray temp dir for node ``name`` of the stack in ``home``: /tmp/rh-<6 hex of home>-<name>,
    short because unix socket paths under it are limited to 107 bytes."""
    return f"/tmp/rh-{hashlib.sha256(str(home).encode()).hexdigest()[:6]}-{name}"


def python_path() -> str:
    """What a Ray process needs on PYTHONPATH to import rayhorde's packages by name (cloudpickle
    references functions by module; verifier factories are "module:callable"): the folder that
    holds the installed ``cluster`` package (the checkout in an editable install)."""
    return str(package_root())


def ray_env(token: str, base_env: dict | None = None, *, node_ip: str = LOOPBACK) -> dict[str, str]:
    """Minimal environment for Ray processes: allow-listed variables of ``base_env``
    (default ``os.environ``), the venv first on PATH, token auth; on loopback when ``node_ip`` is."""
    src = os.environ if base_env is None else base_env
    env = {k: src[k] for k in ENV_ALLOW_LIST if k in src}
    env.setdefault("HOME", os.path.expanduser("~"))
    env.setdefault("LANG", "C.UTF-8")
    venv_bin = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([venv_bin, src.get("PATH") or "/usr/local/bin:/usr/bin:/bin"])
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")  # no usage report
    if node_ip == LOOPBACK:  # keeps node IP resolution and listeners on 127.0.0.1
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the forked child only calls into it


def _drop_ambient_capabilities() -> None:
    """In the child, before exec: a role given ambient capabilities (validator-core's
    CAP_NET_ADMIN, for its firewall) must not pass them to Ray, whose processes run whatever a
    cluster member sends (a task pinned to the head could otherwise rewrite the firewall)."""
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def spawn(cmd: list[str], env: dict, log_path: str, cwd: str) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its pgid is its pid: ``stop_process`` signals that group),
    in ``cwd``, stdout and stderr appended to ``log_path``, with no ambient capabilities."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    os.makedirs(cwd, exist_ok=True)
    with open(log_path, "ab", buffering=0) as log:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_drop_ambient_capabilities)


def head_command(ports: HeadPorts, *, temp_dir: str, num_cpus: int, object_store_mb: int, num_gpus: int = 0,
                 resources: dict | None = None, autoscaling_config: str | None = None) -> list[str]:
    """``ray start --head --block`` on 127.0.0.1 with every port of ``ports`` explicit."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block"]
    if autoscaling_config is not None:
        cmd.append(f"--autoscaling-config={autoscaling_config}")
    cmd += [
        f"--node-ip-address={LOOPBACK}", f"--port={ports.gcs}",
        "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={ports.dashboard}", f"--ray-client-server-port={ports.client_server}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_http}",
        f"--metrics-export-port={ports.metrics_export}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        f"--node-manager-port={ports.node_manager}", f"--object-manager-port={ports.object_manager}",
        f"--min-worker-port={ports.min_worker}", f"--max-worker-port={ports.max_worker}",
        f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
    ]
    if resources is not None:
        cmd.append(f"--resources={json.dumps(resources)}")
    return cmd + [f"--object-store-memory={object_store_mb * 1024 * 1024}", f"--temp-dir={temp_dir}",
                  "--disable-usage-stats"]


def head_env(token: str, temp_dir: str, *, node_ip: str = LOOPBACK) -> dict[str, str]:
    """A head's environment: ``ray_env`` plus its TMPDIR, and no drain on SIGTERM (a 2.60 head
    otherwise "drains" itself for up to 30 s, which never completes for a head: 0 makes
    ``stop_process`` take ~2-4 s instead of ~30 s)."""
    return {**ray_env(token, node_ip=node_ip), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "TMPDIR": temp_dir}


def start_head(*, ports: HeadPorts, temp_dir: str, token: str, num_cpus: int = 1,
               object_store_mb: int = 100, log_path: str, extra_env: dict | None = None,
               cwd: str | None = None, node_ip: str = LOOPBACK,
               sandbox_spec: sandbox.SandboxSpec | None = None) -> subprocess.Popen:
    """Start a head node (this module's ``head`` entry point) on ``node_ip`` in a new session;
    returns at once (see wait_head_ready). No Ray Client server; the dashboard on 127.0.0.1.
    Given ``sandbox_spec`` (see :func:`node_sandbox`), every Ray process runs inside it.

    Head tasks run in ``cwd``, by default an empty ``<temp_dir>/cwd`` (not the session files)."""
    cmd = [sys.executable, "-m", "cluster.fabric.ray_node", "head", f"--node-ip-address={node_ip}",
           f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", f"--object-store-mb={object_store_mb}",
           f"--ports-base={ports.gcs}", "--resources={}"]
    if sandbox_spec is not None:
        cmd.append(f"--sandbox={sandbox_spec.model_dump_json()}")
    env = {**head_env(token, temp_dir, node_ip=node_ip), "PYTHONPATH": python_path(), **(extra_env or {})}
    return spawn(cmd, env, log_path, cwd or os.path.join(temp_dir, "cwd"))


def node_sandbox(ray_user: str | None, temp_dir: str, cwd: str | None = None, *,
                 read_only: list[str] = ()) -> sandbox.SandboxSpec | None:
    """The sandbox of a node whose temp dir is ``temp_dir`` (its HOME is ``<temp_dir>/home``) and
    whose tasks run in ``cwd`` (default ``<temp_dir>/cwd``); None when ``ray_user`` is unset."""
    cwd = cwd or os.path.join(temp_dir, "cwd")
    return sandbox.spec_for(ray_user, home=os.path.join(temp_dir, "home"), writable=[temp_dir, cwd],
                            read_only=list(read_only))


def wait_head_ready(ports: HeadPorts, token: str, timeout_s: float = 60) -> None:
    """Poll the dashboard's Jobs REST API (with the token) until it answers 200."""
    url = f"{ports.dashboard_url}/api/jobs/"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as e:  # HTTPError is a URLError
            last = e
        time.sleep(0.25)
    raise TimeoutError(f"Ray head dashboard {url} not ready after {timeout_s:.0f}s (last: {last})")


def start_worker(*, gcs_address: str, temp_dir: str, token: str, resources: dict[str, float],
                 num_cpus: int, object_store_mb: int, node_ports_base: int, node_id_file: str,
                 log_path: str, cwd: str, extra_env: dict | None = None, node_ip: str = LOOPBACK,
                 sandbox_spec: sandbox.SandboxSpec | None = None) -> subprocess.Popen:
    """Start a worker node (this module's ``worker`` entry point) in a new session, in ``cwd``.

    It writes ``{"node_id", "pid"}`` to ``node_id_file`` once the node is registered in the GCS
    (in a sandbox, the file must lie in one of its writable folders).
    """
    HeadPorts.from_base(node_ports_base)  # validate early, in the caller
    cmd = [
        sys.executable, "-m", "cluster.fabric.ray_node", "worker",
        f"--gcs-address={gcs_address}", f"--temp-dir={temp_dir}",
        f"--resources={json.dumps(resources)}", f"--num-cpus={num_cpus}",
        f"--object-store-mb={object_store_mb}", f"--ports-base={node_ports_base}",
        f"--node-id-file={os.path.abspath(node_id_file)}", f"--node-ip-address={node_ip}",
    ]
    # cwd is empty, so the launcher (and, inheriting it, Ray workers, which must import rayhorde
    # modules that cloudpickle references by name) find this package through PYTHONPATH.
    if sandbox_spec is not None:
        cmd.append(f"--sandbox={sandbox_spec.model_dump_json()}")
    env = {**ray_env(token, node_ip=node_ip), "PYTHONPATH": python_path(), "TMPDIR": temp_dir, **(extra_env or {})}
    return spawn(cmd, env, log_path, cwd)


def stop_process(proc_or_pid, timeout_s: float = 15) -> None:
    """Stop a process we started, its process group (pgid == pid, start_new_session) and its
    descendants; never by name.

    SIGTERM goes to the leader first: ``ray start --block`` / the worker launcher then tear their
    node down in order (~0.3-4 s); SIGTERM to the whole group at once kills the GCS under the
    head's leader, which then hangs ~20-30 s. Then SIGTERM and SIGKILL to the group. Ray's worker
    processes (``ray::IDLE``, tasks, actors) get their OWN process groups, so descendants are
    recorded first (with their start times) and any still alive at the end get SIGKILL by pid.
    """
    proc = proc_or_pid if isinstance(proc_or_pid, subprocess.Popen) else None
    pid = proc.pid if proc else int(proc_or_pid)
    family = processes.descendants(pid)

    def group_gone() -> bool:
        if proc is not None:
            proc.poll()
        return not processes.group_alive(pid)

    steps = ((os.kill, signal.SIGTERM, timeout_s), (os.killpg, signal.SIGTERM, 3.0),
             (os.killpg, signal.SIGKILL, 5.0))
    for send, sig, wait_s in steps:
        if group_gone():
            break
        if send is os.kill and proc is not None and proc.returncode is not None:
            continue  # leader already reaped: its pid may be reused, signal the group only
        try:
            send(pid, sig)
        except ProcessLookupError:
            pass
        processes.wait_until(group_gone, wait_s)
    # workers exit on their own once the raylet is gone
    processes.wait_until(lambda: not processes.live(family), 3.0)
    for p in processes.live(family):
        processes.signal_pid(p, signal.SIGKILL)
    if proc is not None:
        proc.poll()


def _node_main(role: str, argv: list[str]) -> int:
    """Run one Ray node (``head`` or ``worker``) until SIGTERM, with every port explicit; first,
    given ``--sandbox``, enter it (before Ray starts a thread or a process)."""
    for arg in argv:
        if arg.startswith("--sandbox="):
            sandbox.enter(sandbox.SandboxSpec.model_validate_json(arg.partition("=")[2]))
    import ray._private.node
    import ray._private.parameter
    import ray._private.services
    import ray._private.utils

    p = argparse.ArgumentParser(prog=f"ray_node {role}")
    for name in ("temp-dir", "resources", "node-ip-address"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--gcs-address", required=role == "worker")
    p.add_argument("--sandbox", default=None)  # entered above
    p.add_argument("--node-id-file", required=role == "worker")
    for name in ("num-cpus", "object-store-mb", "ports-base"):
        p.add_argument(f"--{name}", type=int, required=True)
    a = p.parse_args(argv)
    ports = HeadPorts.from_base(a.ports_base)
    params = ray._private.parameter.RayParams(
        node_ip_address=a.node_ip_address, temp_dir=a.temp_dir,
        num_cpus=a.num_cpus, num_gpus=0, resources=json.loads(a.resources),
        object_store_memory=a.object_store_mb * 1024 * 1024,
        node_manager_port=ports.node_manager, object_manager_port=ports.object_manager,
        metrics_agent_port=ports.dashboard_agent_grpc,
        dashboard_agent_listen_port=ports.dashboard_agent_http,
        metrics_export_port=ports.metrics_export, runtime_env_agent_port=ports.runtime_env_agent,
        min_worker_port=ports.min_worker, max_worker_port=ports.max_worker,
    )
    if role == "head":  # what `ray start --head` sets, minus the Ray Client server
        params.update(gcs_server_port=ports.gcs, include_dashboard=True, dashboard_host=LOOPBACK,
                      dashboard_port=ports.dashboard)
    else:
        params.update(gcs_address=a.gcs_address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    node = ray._private.node.Node(params, head=role == "head", shutdown_at_exit=False, spawn_reaper=False)
    try:
        ray._private.services.wait_for_node(node.gcs_address, node.plasma_store_socket_name, 60)
        if role == "head":  # what `ray start --head` records: Jobs drivers find their cluster by it
            ray._private.utils.write_ray_address(node.gcs_address, a.temp_dir)
        if a.node_id_file:
            tmp = f"{a.node_id_file}.tmp"
            with open(tmp, "w") as f:
                json.dump({"node_id": node.node_id, "pid": os.getpid()}, f)
            os.replace(tmp, a.node_id_file)
        while not stop.wait(1.0):
            # like `ray start --block`: a node whose raylet (or GCS...) died is gone as a whole, e.g.
            # a raylet the head declared dead after a cut link exits when the link returns; the
            # agent watching this process then reports it and rejoins
            dead = [kind for kind, _ in node.dead_processes()]
            if dead:
                print(f"ray_node {role}: {', '.join(dead)} exited; stopping the node", file=sys.stderr, flush=True)
                return 1
    finally:
        node.kill_all_processes(check_alive=False, allow_graceful=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] not in (["head"], ["worker"]):
        sys.exit("usage: python -m cluster.fabric.ray_node {head,worker} --node-ip-address=... ...")
    sys.exit(_node_main(sys.argv[1], sys.argv[2:]))
