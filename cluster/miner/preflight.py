"""``rayhorde miner check``: what a miner host needs before ``miner run`` can work, one named
check at a time, every one run even after a failure (an operator fixes them all in one go).

    wallet            the hotkey loads from bittensor's layout
    container engine  dockerd answers on ``docker_host``
    GPU toolkit       the NVIDIA runtime works (only when a GPU executor class is offered)
    validator         validator-core answers at ``validator_url`` (TLS verified) as ``validator_hotkey``
    clock             this host's clock is within ``max_clock_skew_s`` of validator-core's
    registration      the hotkey is registered on the subnet and not banned (validator-core's view)
    Ray ports         validator-core can open TCP connections to this node's Ray ports
    proxy port        ... and to the streaming proxy's port

The port checks bind a listener on each free port for the duration of the check (a running agent's
own listeners answer for themselves), then ask validator-core, in a request signed with the
hotkey, to connect back to this host's address.
"""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from dataclasses import dataclass

from cluster.errors import RayhordeError
from cluster.fabric.ports import HeadPorts
from cluster.protocol.canonical import NS
from cluster.protocol.envelope import seal
from cluster.protocol.http import ServiceClient
from cluster.protocol.identity import Hotkey, load_wallet
from cluster.protocol.messages import Preflight, PreflightAnswer
from cluster.settings import MinerSettings, load_executor_classes


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def ray_ports(settings: MinerSettings) -> dict[str, int]:
    """The ports of this miner's Ray node that the validator's head must reach."""
    p = HeadPorts.from_base(settings.node_port_base)
    return {"node manager": p.node_manager, "object manager": p.object_manager,
            "dashboard agent": p.dashboard_agent_grpc, "dashboard agent http": p.dashboard_agent_http,
            "first worker": p.min_worker, "last worker": p.max_worker}


def proxy_port(settings: MinerSettings) -> int:
    return settings.proxy_port or settings.node_port_base + 9


def run_checks(settings: MinerSettings, *, connect_timeout_s: float = 3) -> list[Check]:
    checks: list[Check] = []
    hotkey = _wallet(settings, checks)
    _engine(settings, checks)
    validator = ServiceClient(settings.validator_url, timeout_s=30, verify=settings.ca_bundle_path)
    if not _validator(settings, validator, checks):
        checks.append(Check("registration", False, "not checked: validator-core did not answer"))
        checks.append(Check("Ray ports", False, "not checked: validator-core did not answer"))
        return checks
    if hotkey is None:
        checks.append(Check("registration", False, "not checked: no hotkey to sign with"))
        return checks
    if not settings.node_port_base:
        checks.append(Check("Ray ports", False, "node_port_base is 0 (random ports at every start): set it, so the "
                            "firewall can open exactly these ports to the validator"))
        return checks
    ray = ray_ports(settings)
    wanted = {**ray, "proxy": proxy_port(settings)}
    with ExitStack() as stack:
        for name, port in wanted.items():
            host = settings.proxy_host if name == "proxy" else settings.ray_node_ip
            sock = _listen(host, port)
            if sock is not None:
                stack.callback(sock.close)
        try:
            answer = PreflightAnswer.model_validate(validator.post_signed("/v1/admission/preflight", seal(
                hotkey, "admission_preflight", Preflight(validator=settings.validator_hotkey,
                                                         address=settings.ray_node_ip,
                                                         ports=sorted(set(wanted.values()))))))
        except RayhordeError as exc:
            where = "Ray ports" if getattr(exc, "reason", "") == "address_mismatch" else "registration"
            checks.append(Check(where, False, f"preflight refused: {exc}"))
            return checks
    ok = answer.registered and not answer.banned
    checks.append(Check("registration", ok, "registered, not banned" if ok else answer.detail))
    blocked = [f"{name} {port}" for name, port in ray.items() if not answer.reachable.get(port)]
    checks.append(Check("Ray ports", not blocked, f"validator-core reached {settings.ray_node_ip} on "
                        f"{', '.join(f'{n} {p}' for n, p in ray.items())}" if not blocked else
                        f"validator-core could not connect to {settings.ray_node_ip} on {', '.join(blocked)} within "
                        f"{answer.connect_timeout_s:g} s: open these TCP ports (and the worker range "
                        f"{ray['first worker']}-{ray['last worker']}) to the validator's address"))
    port = wanted["proxy"]
    reached = bool(answer.reachable.get(port))
    checks.append(Check("proxy port", reached, f"validator-core reached port {port}" if reached else
                        f"validator-core could not connect to port {port}: open it to the validator and to users"))
    return checks


def _wallet(settings: MinerSettings, checks: list[Check]) -> Hotkey | None:
    try:
        hotkey = load_wallet(settings.wallet_path, settings.wallet_name, settings.wallet_hotkey)
    except RayhordeError as exc:
        checks.append(Check("wallet", False, str(exc)))
        return None
    checks.append(Check("wallet", True, f"hotkey {hotkey.ss58}"))
    return hotkey


def _engine(settings: MinerSettings, checks: list[Check]) -> None:
    from cluster.miner.docker_runtime import DockerRuntime  # docker-py: only when checking
    from cluster.miner.runtime import RuntimeFeature

    try:
        runtime = DockerRuntime(settings.docker_host)
        runtime.ping()
    except Exception as exc:  # docker-py raises many kinds: every one means "not reachable"
        checks.append(Check("container engine", False, f"{settings.docker_host}: {exc}"))
        return
    checks.append(Check("container engine", True, f"answers on {settings.docker_host}"))
    try:
        classes = load_executor_classes(settings.executor_classes_path)
    except RayhordeError as exc:
        checks.append(Check("GPU toolkit", False, str(exc)))
        return
    gpu = sorted(c for c in settings.executor_classes if c in classes and classes[c].gpus > 0)
    if not gpu:
        checks.append(Check("GPU toolkit", True, "not needed: no GPU executor class offered"))
    elif RuntimeFeature.GPU in runtime.features:
        checks.append(Check("GPU toolkit", True, f"works, for {gpu}"))
    else:
        checks.append(Check("GPU toolkit", False, f"{gpu} offered but {runtime.gpu_refusal}"))


def _validator(settings: MinerSettings, client: ServiceClient, checks: list[Check]) -> bool:
    t0 = time.time_ns()
    try:
        health = client.get("/v1/health")
    except RayhordeError as exc:
        checks.append(Check("validator", False, f"{settings.validator_url}: {exc}"))
        return False
    t1 = time.time_ns()
    if health.get("validator") != settings.validator_hotkey:
        checks.append(Check("validator", False, f"{settings.validator_url} is validator {health.get('validator')}, "
                            f"not validator_hotkey {settings.validator_hotkey}: fix one of them"))
        return False
    checks.append(Check("validator", True, f"{settings.validator_url} answers as {settings.validator_hotkey}"))
    skew_s = (int(health.get("time_ns", 0)) - (t0 + t1) // 2) / NS
    ok = abs(skew_s) <= settings.max_clock_skew_s
    side = "behind" if skew_s > 0 else "ahead of"
    checks.append(Check("clock", ok, f"this host is {abs(skew_s):.2f} s {side} validator-core (allowed "
                        f"{settings.max_clock_skew_s:g} s)"
                        + ("" if ok else ": sync this host's clock (chrony or systemd-timesyncd)")))
    return True


def _listen(host: str, port: int) -> socket.socket | None:
    """A listener on ``host:port`` for the validator to connect to, or None if the port is taken
    (a running agent's node or proxy answers for itself)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(16)
        return sock
    except OSError:
        sock.close()
        return None
