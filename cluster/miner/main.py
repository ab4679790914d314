"""Run a miner agent: ``python -m cluster.miner.main --config configs/miner.local.toml``.

Lifecycle: clean up containers left by a previous run -> admission (challenge, signed join) ->
executor API on a unix socket -> Ray worker node on ``ray_node_ip`` (a separate process with an
allow-listed environment: no hotkey, wallet path or validator URL reaches Ray workers) -> report
the node id -> signed heartbeats until SIGTERM -> kill containers, stop the node.

When the node dies (killed, or the link to the validator was cut long enough for the head to
declare it dead) the agent kills its containers, reports ``node_lost`` (retrying until
validator-core hears it), joins again with a fresh signed admission and starts a new node: a
miner host whose link comes back rejoins without an operator.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cluster.fabric import ray_node
from cluster.protocol.envelope import seal
from cluster.protocol.http import ServiceClient
from cluster.fabric.ports import find_free_port_base
from cluster.fabric.processes import command_line
from cluster.protocol.identity import Hotkey, load_wallet
from cluster.protocol.jobs import AGENT_SOCKET_ENV
from cluster.miner.agent import AgentCore
from cluster.miner.docker_runtime import DockerRuntime
from cluster.miner.executor_api import ExecutorServer
from cluster.miner.runtime import RuntimeFeature
from cluster.miner.streams import StreamKeeper
from cluster.protocol.messages import (
    Challenge, ChallengeRequest, Heartbeat, JoinAccepted, JoinRequest, NodeLost, NodeStarted,
)
from cluster.settings import (MODEL_CACHE_ENV, MinerSettings, add_wallet_args, default_model_cache,
                              load_executor_classes, load_settings, wallet_overrides)
from cluster.protocol.version import local_versions
from cluster.errors import ConfigError, Refused, ServiceUnavailable

log = logging.getLogger("rayhorde.agent")


def admit(client: ServiceClient, hotkey: Hotkey, settings: MinerSettings, proxy_url: str) -> JoinAccepted:
    ch = Challenge.model_validate(client.post("/v1/admission/challenge",
                                              ChallengeRequest(miner_hotkey=hotkey.ss58).model_dump()))
    req = JoinRequest(validator=settings.validator_hotkey, challenge=ch.nonce, executor_classes=settings.executor_classes,
                      proxy_url=proxy_url, versions=local_versions())
    return JoinAccepted.model_validate(client.post_signed("/v1/admission/join", seal(hotkey, "admission_join", req)))


def wait_for_file(path: Path, proc, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"Ray worker node exited with {proc.returncode} before it was up")
        time.sleep(0.1)
    raise TimeoutError(f"Ray worker node did not come up within {timeout_s:.0f} s")


def _stop_orphaned_node(node_file: Path) -> None:
    """A previous agent that was killed leaves its Ray node running (its own session): stop it,
    by the PID it recorded, before starting ours on the same ports."""
    try:
        pid = int(json.loads(node_file.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    if ray_node.__name__ in command_line(pid):  # else the PID was reused by another program
        log.warning("stopping the Ray node (pid %d) a previous agent left behind", pid)
        ray_node.stop_process(pid)
    node_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None)
    add_wallet_args(ap)
    args = ap.parse_args(argv)
    try:
        settings = load_settings(MinerSettings, args.config, env_prefix="RAYHORDE_MINER_", **wallet_overrides(args))
        hotkey = load_wallet(settings.wallet_path, settings.wallet_name, settings.wallet_hotkey)
        home = settings.home
        temp_dir = str(settings.ray_temp_dir or Path(f"/tmp/rh-{hotkey.ss58[:8].lower()}"))
        node_cwd = home / "node-cwd"  # an empty directory: what a Ray task on this node sees as its cwd
        executor_dir = home / "executor"  # holds the agent's socket: the one folder of home a sandboxed node sees
        jail = ray_node.node_sandbox(settings.ray_user, temp_dir, str(node_cwd), read_only=[str(executor_dir)])
    except ConfigError as exc:  # one line: what is wrong and how to fix it
        print(f"miner agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s agent[{settings.name}] %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat and receipt page
    home.mkdir(parents=True, exist_ok=True)
    runtime = DockerRuntime(settings.docker_host)
    runtime.ping()
    classes = load_executor_classes(settings.executor_classes_path)
    gpu_classes = [c for c in settings.executor_classes if c in classes and classes[c].gpus > 0]
    if gpu_classes and RuntimeFeature.GPU not in runtime.features:
        log.error("refusing to offer %s: %s", gpu_classes, runtime.gpu_refusal)
        return 2
    validator = ServiceClient(settings.validator_url, timeout_s=60, verify=settings.ca_bundle_path)
    core = AgentCore(hotkey=hotkey, validator_hotkey=settings.validator_hotkey, validator=validator, runtime=runtime,
                     classes=classes, home=home,
                     max_skew_s=settings.max_clock_skew_s, image_user=settings.image_user,
                     allow_private_networks=settings.allow_private_networks, hf_endpoint=settings.hf_endpoint)
    left = core.kill_all()
    dirs = core.clean_leftovers()
    if left or dirs:  # their tickets are retired when we re-join (validator-core: agent_restarted)
        log.warning("removed %d containers and the job dirs of tickets %s left by a previous run", left, dirs)
    _stop_orphaned_node(home / "node.json")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    ports_base = settings.node_port_base or find_free_port_base()
    proxy_port = settings.proxy_port or ports_base + 9  # a free slot of the node's port block
    scheme = "https" if settings.tls_cert_path else "http"
    proxy_url = settings.proxy_url or f"{scheme}://{settings.proxy_host}:{proxy_port}"
    try:
        accepted = admit(validator, hotkey, settings, proxy_url)
    except Refused as exc:
        log.error("admission refused: %s", exc)
        return 2
    log.info("admitted by %s: resources %s", accepted.validator_hotkey, accepted.resources)
    volumes = home / "stream-volumes"  # never shown to the Ray node: apps read through the agent
    shutil.rmtree(volumes, ignore_errors=True)  # streams of a previous run ended when we re-joined
    keeper = StreamKeeper(hotkey, validator, validator_hotkey=settings.validator_hotkey, proxy_port=proxy_port,
                          proxy_url=proxy_url, serve_url=f"http://127.0.0.1:{accepted.serve_http_port}",
                          volumes_dir=volumes, idle_timeout_s=settings.stream_idle_timeout_s,
                          max_skew_s=settings.max_clock_skew_s, volume_max_bytes=settings.stream_volume_max_mb * 2**20,
                          request_max_bytes=settings.stream_request_max_kb * 1024,
                          receipts_path=settings.home / "receipts.db",  # kept across restarts, till pulled
                          proxy_host=settings.proxy_host, tls_cert_path=settings.tls_cert_path,
                          tls_key_path=settings.tls_key_path)
    keeper.start()
    executor_dir.mkdir(mode=0o750, exist_ok=True)
    sock = executor_dir / "agent.sock"
    sock.unlink(missing_ok=True)
    server = ExecutorServer(core, str(sock), volumes=keeper.read_volume)
    server.start()
    if jail is not None:  # the node's user reaches the socket through its group, and nothing else here
        for path, mode in ((executor_dir, 0o750), (sock, 0o660)):
            os.chown(path, 0, jail.gid)
            os.chmod(path, mode)
    node_cwd.mkdir(exist_ok=True)
    node_file = home / "node.json"  # the agent's own record {node_id, pid}: a node never writes it
    node_id_file = Path(temp_dir) / "node-id.json"  # what the node's launcher writes once it is up

    def start_node() -> tuple[subprocess.Popen, str]:
        node_file.unlink(missing_ok=True)
        node_id_file.unlink(missing_ok=True)
        proc = ray_node.start_worker(
            gcs_address=accepted.gcs_address, temp_dir=temp_dir, token=accepted.ray_token,
            resources=accepted.resources, num_cpus=settings.num_cpus, object_store_mb=settings.object_store_mb,
            node_ports_base=ports_base, node_id_file=str(node_id_file), log_path=str(home / "ray-node.log"),
            node_ip=settings.ray_node_ip, cwd=str(node_cwd), sandbox_spec=jail,
            extra_env={AGENT_SOCKET_ENV: str(sock), MODEL_CACHE_ENV: str(default_model_cache())})
        try:
            node_id = str(wait_for_file(node_id_file, proc, timeout_s=60)["node_id"])
            # the pid comes from here, not from the node's file: a node's process must never name
            # what the agent (root) stops when it restarts
            node_file.write_text(json.dumps({"node_id": node_id, "pid": proc.pid}))
        except BaseException:
            ray_node.stop_process(proc)  # its group: a raylet or log monitor it started must not outlive it
            raise
        for attempt in range(5):  # validator-core checks the node with Ray, which may lag a moment
            try:
                validator.post_signed("/v1/admission/node", seal(hotkey, "node_started", NodeStarted(node_id=node_id)))
                break
            except Refused as exc:
                if exc.reason != "node_unknown" or attempt == 4:
                    ray_node.stop_process(proc)
                    raise
                time.sleep(1)
        log.info("Ray node %s up (pid %s); serving tickets on %s", node_id, proc.pid, sock)
        return proc, node_id

    def rejoin(lost_node: str | None, why: str) -> tuple[subprocess.Popen, str]:
        """The node is gone (or validator-core forgot us): end its work, report it, join again
        and start a new node. Retries until it works or we are stopped."""
        nonlocal accepted
        core.node_epoch += 1
        keeper.node_lost()  # open streams end now, with an error
        lost = sorted(core.running)
        killed = core.kill_all()
        log.error("%s; killed %d containers of tickets %s; rejoining", why, killed, lost)
        reported = lost_node is None
        while not stop.is_set():
            try:
                if not reported:
                    try:
                        validator.post_signed("/v1/admission/node_lost", seal(hotkey, "node_lost", NodeLost(
                            node_id=lost_node, running_tickets=lost)))
                    except Refused as exc:  # e.g. not_admitted: validator-core already settled that node
                        log.warning("node_lost not taken (%s)", exc)
                    reported = True
                accepted = admit(validator, hotkey, settings, proxy_url)
                return start_node()
            except Refused as exc:
                if exc.reason not in ("not_admitted", "bad_challenge"):  # banned, deregistered, wrong version
                    log.error("rejoin refused: %s; an operator must act", exc)
                    raise SystemExit(2)
                log.warning("rejoin refused (%s); retrying", exc)
            except (ServiceUnavailable, TimeoutError, RuntimeError) as exc:
                log.warning("rejoin failed (%s); retrying in %.0f s", exc, accepted.heartbeat_interval_s)
            stop.wait(accepted.heartbeat_interval_s)
        raise SystemExit(0)

    proc = None
    try:
        proc, node_id = start_node()
        while not stop.wait(accepted.heartbeat_interval_s):
            if proc.poll() is not None:
                # Our Ray node died under us (killed by a cluster member, or declared dead by the
                # head after our link was cut): its tasks are gone, so its containers go too, and
                # validator-core re-tickets their jobs as a fabric incident.
                ray_node.stop_process(proc)  # whatever of its group survived
                proc, node_id = rejoin(node_id, f"Ray node {node_id} exited with {proc.returncode}")
                continue
            try:
                answer = validator.post_signed("/v1/heartbeat", seal(hotkey, "heartbeat",
                                                                     Heartbeat(running_tickets=sorted(core.running))))
            except Refused as exc:
                if exc.reason != "not_admitted":  # e.g. clock_skew: say so, keep serving (as for any failure)
                    log.warning("heartbeat refused: %s", exc)
                    continue
                ray_node.stop_process(proc)  # validator-core dropped us: a new admission, a new node
                proc, node_id = rejoin(None, f"validator-core no longer knows this miner ({exc})")
                continue
            except Exception as exc:  # validator-core restarting, or the link is down; keep serving
                log.warning("heartbeat failed: %s", exc)
                continue
            keeper.update(answer.get("streams") or [])
            stale = answer.get("kill_tickets") or []
            if stale:  # cancelled by their user or given to another miner
                log.info("killing %d containers of tickets no longer ours: %s", core.kill_tickets(stale), stale)
        return 0
    finally:
        keeper.stop()
        killed = core.kill_all()
        core.clean_leftovers()  # job threads die with us: their tmpfs mounts and dirs must not
        if proc is not None:
            ray_node.stop_process(proc)
        server.stop()
        sock.unlink(missing_ok=True)
        log.info("stopped (killed %d containers)", killed)


if __name__ == "__main__":
    raise SystemExit(main())
