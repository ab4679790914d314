"""Separate test hosts on one machine, made of Linux network namespaces (needs root and ``ip``).

A :class:`Topology` builds one namespace per host (``rh<tag>-validator``, ``rh<tag>-miner1``, ...)
and one more for the bridge (``rh<tag>-br``). Each host has ``lo`` and an ``eth0`` with its own
address in a ``10.a.b.0/24`` that overlaps nothing routed on the machine, and no default route;
``eth0``'s peer is a port of the bridge, which has no address. The veths are created directly
inside the namespaces, so the machine's own namespace never gets an interface or a route of the
topology: traffic can only go from one test host to another, never out and never in.

Each host runs its own commands in its network namespace with its own home directory. They enter
it with ``nsenter --net`` rather than ``ip netns exec``: the latter also gives each command a
mount namespace of its own, so a tmpfs the miner agent mounts for a job's ``/artifacts`` would
be invisible to the container engine (it runs in the machine's namespace, as on a real miner
host, where agent and engine share one mount table). Namespaces share
the machine's process IDs and files, so teardown ends processes by PID: first the ones a host
started (their whole process group), then whatever is still in each namespace (``ip netns
pids``, which also finds daemons that left their session), and only then deletes the namespaces,
which removes the veths with them. Teardown runs even when the ``with`` block raised, and
:meth:`Topology.leftovers` says what, if anything, survived.

Tags are random and guarded by a lock file held for the topology's life (``flock``, released by
the kernel when its owner dies), so :func:`cleanup_stale` removes what a crashed run left behind
and never a topology another live process is using.

Plain Python with no pytest import: the tests' fixture and the benchmarks both build on it.
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["Host", "Topology", "cleanup_stale", "missing_requirements"]

IP = shutil.which("ip") or "/usr/sbin/ip"
NFT = shutil.which("nft") or "/usr/sbin/nft"
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"
NFT_TABLE = "rhtopo"
# The exact names this module makes; cleanup_stale touches nothing else.
NS_PATTERN = re.compile(r"^rh([0-9a-f]{4})-[A-Za-z0-9_]+$")
BRIDGE_NS = "br"  # the bridge namespace's suffix, so no host may be called "br"
LOCK_DIR = Path("/run/rhtopo") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / "rhtopo"
_ROUTE_TYPES = {"unicast", "local", "broadcast", "multicast", "unreachable", "blackhole", "prohibit", "throw"}


def missing_requirements() -> str | None:
    """Why topologies cannot be built here (a sentence naming the fix), or None when they can."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root (ip netns add); run the tests as root"
    if not os.access(IP, os.X_OK):
        return "the `ip` command (iproute2) is missing; install iproute2"
    if not os.access(NSENTER, os.X_OK):
        return "the `nsenter` command (util-linux) is missing; install util-linux"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {out.stderr.strip() or out.stdout.strip()}")
    return out


def _netns_list() -> list[str]:
    # `ip netns list` prints "name (id: N)" once a namespace has a peer; keep the name only
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, waiting for its parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in pids if _alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _empty_namespace(ns: str, grace_s: float) -> None:
    """End every process in ``ns``: SIGTERM, ``grace_s`` to exit, then SIGKILL; repeated because a
    dying process may still have forked a child into the namespace."""
    for _ in range(5):
        pids = [p for p in _netns_pids(ns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            _signal(pid, signal.SIGTERM, group=False)
        left = _wait_gone(pids, grace_s)
        for pid in left:
            _signal(pid, signal.SIGKILL, group=False)
        _wait_gone(left, 5)


class _TagLock:
    """An exclusive ``flock`` on ``LOCK_DIR/<tag>.lock``: held by the process that owns the tag's
    namespaces, released by the kernel if that process dies, so a lock nobody holds means stale."""

    def __init__(self, tag: str, fd: int):
        self.tag, self.fd = tag, fd

    @classmethod
    def try_acquire(cls, tag: str) -> "_TagLock | None":
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        path = LOCK_DIR / f"{tag}.lock"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Whoever held it before may have unlinked it before releasing: then ours is a dead inode
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        return cls(tag, fd)

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.tag}.lock"

    def read(self) -> dict:
        try:
            return json.loads(os.pread(self.fd, 1 << 16, 0) or b"{}")
        except ValueError:
            return {}

    def write(self, info: dict) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self.fd < 0:
            return
        self.path.unlink(missing_ok=True)  # unlink before unlocking: a waiter then sees a dead inode
        os.close(self.fd)
        self.fd = -1


def _locked_subnets() -> list[ipaddress.IPv4Network]:
    """Subnets of the topologies other live processes hold (their lock files say which)."""
    nets = []
    for path in LOCK_DIR.glob("*.lock") if LOCK_DIR.is_dir() else ():
        try:
            nets.append(ipaddress.ip_network(json.loads(path.read_text())["subnet"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return nets


def _machine_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix routed or assigned in the machine's namespace, except the default route."""
    nets = []
    for line in _ip("-4", "-o", "route", "show", "table", "all").stdout.splitlines():
        words = line.split()
        if words and words[0] in _ROUTE_TYPES:
            words = words[1:]
        if words and words[0] != "default":
            try:
                nets.append(ipaddress.ip_network(words[0], strict=False))
            except ValueError:
                continue
    for line in _ip("-4", "-o", "addr").stdout.splitlines():
        words = line.split()
        if "inet" in words:
            nets.append(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
    return nets


def cleanup_stale(prefix: str = "rh") -> list[str]:
    """Delete namespaces (and the processes in them) that a crashed run of this module left behind:
    names of the exact form ``rh<4 hex>-<host>`` whose tag lock nobody holds, and that run's temp
    home folder. A topology another live process is using holds its lock and is left alone.
    Returns the namespaces removed."""
    if prefix != "rh":
        raise ValueError(f"cleanup_stale only knows this module's own names (prefix 'rh'), not {prefix!r}")
    by_tag: dict[str, list[str]] = {}
    for ns in _netns_list():
        m = NS_PATTERN.match(ns)
        if m:
            by_tag.setdefault(m.group(1), []).append(ns)
    stale_locks = {p.stem for p in LOCK_DIR.glob("*.lock") if re.fullmatch(r"[0-9a-f]{4}", p.stem)} \
        if LOCK_DIR.is_dir() else set()
    removed = []
    for tag in sorted(set(by_tag) | stale_locks):
        lock = _TagLock.try_acquire(tag)
        if lock is None:
            continue  # alive: its owner holds the lock
        try:
            # Hosts first, bridge last, like teardown; listed again now that the tag is ours
            names = sorted((ns for ns in _netns_list() if ns.startswith(f"rh{tag}-") and NS_PATTERN.match(ns)),
                           key=lambda n: n.endswith(f"-{BRIDGE_NS}"))
            for ns in names:
                _empty_namespace(ns, grace_s=1)
                _ip("netns", "del", ns, check=False)
                removed.append(ns)
            temp_root = lock.read().get("temp_root")
            if temp_root and Path(temp_root).name.startswith(f"rh-topo-{tag}-"):
                shutil.rmtree(temp_root, ignore_errors=True)
        finally:
            lock.release()
    return removed


class Host:
    """One test host: a network namespace with its own address and home directory."""

    def __init__(self, topology: "Topology", name: str, index: int, ip: str, home: Path):
        self.topology, self.name, self.index = topology, name, index
        self.ns, self.ip, self.home = f"rh{topology.tag}-{name}", ip, home
        self.bridge_port = f"rh{topology.tag}b{index}"  # its veth peer, in the bridge namespace
        self.procs: list[subprocess.Popen] = []
        self._nft = False

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r}, ip={self.ip!r})"

    @property
    def enter(self) -> list[str]:
        """The command prefix that runs a command in this host's network namespace (only)."""
        return [NSENTER, f"--net=/run/netns/{self.ns}", "--"]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment :meth:`popen` uses by default: this process's, with HOME and TMPDIR in
        this host's home (so two hosts never share a temp file), plus ``extra``."""
        tmp = self.home / "tmp"
        tmp.mkdir(exist_ok=True)
        return {**os.environ, "HOME": str(self.home), "TMPDIR": str(tmp), **extra}

    def popen(self, argv: list[str], *, env: dict | None = None, log: Path | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start ``argv`` in this host, in a session of its own, output to ``log`` (default
        ``<home>/<argv0 name>.log``, appended). Teardown stops it."""
        log = log or self.home / f"{Path(argv[0]).name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([*self.enter, *map(str, argv)], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, env=env if env is not None else self.env(),
                                    cwd=cwd or self.home, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], *, timeout_s: float = 60, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` in this host to the end and return its captured text output."""
        out = subprocess.run([*self.enter, *map(str, argv)], capture_output=True, text=True,
                             timeout=timeout_s, env=env if env is not None else self.env(), cwd=self.home,
                             stdin=subprocess.DEVNULL)
        if check and out.returncode != 0:
            raise RuntimeError(f"{argv} in host {self.name} exited {out.returncode}: "
                               f"{(out.stderr or out.stdout).strip()[-2000:]}")
        return out

    def stop(self, proc: subprocess.Popen, grace_s: float | None = None) -> None:
        """Stop one process :meth:`popen` started: SIGTERM to its group, ``grace_s`` (default the
        topology's) to exit, then SIGKILL to the group."""
        grace_s = self.topology.stop_grace_s if grace_s is None else grace_s
        _signal(proc.pid, signal.SIGTERM, group=True)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal(proc.pid, signal.SIGKILL, group=True)  # its group may outlive the leader
        proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def cut(self) -> None:
        """Cut this host off: its bridge port goes down, so nothing reaches it or leaves it."""
        _ip("-n", self.topology.bridge_ns, "link", "set", self.bridge_port, "down")

    def restore(self) -> None:
        """Undo :meth:`cut`."""
        _ip("-n", self.topology.bridge_ns, "link", "set", self.bridge_port, "up")

    def _nft_run(self, script: str) -> None:
        if not os.access(NFT, os.X_OK):
            raise RuntimeError("nft (nftables) is missing; install the `nftables` package")
        out = subprocess.run([IP, "netns", "exec", self.ns, NFT, "-f", "-"], input=script,
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"nft in host {self.name} failed: {out.stderr.strip()}\n{script}")

    def block_inbound(self, ports: list[int] | range, *, from_ip: str | None = None) -> None:
        """Drop inbound TCP to ``ports`` (from ``from_ip`` only, if given) with nftables in this
        host (table ``inet rhtopo``). The host's own traffic to itself (``lo``) still passes: only
        other hosts are blocked. Calls add up; :meth:`unblock_inbound` removes them all."""
        if isinstance(ports, range):
            if ports.step != 1 or not ports:
                raise ValueError(f"block_inbound needs a contiguous, non-empty range, not {ports}")
            match = f"{ports.start}-{ports.stop - 1}"
        else:
            if not ports:
                raise ValueError("block_inbound needs at least one port")
            match = "{ " + ", ".join(str(int(p)) for p in ports) + " }"
        source = f"ip saddr {ipaddress.ip_address(from_ip)} " if from_ip else ""
        script = ""
        if not self._nft:
            script += (f"table inet {NFT_TABLE} {{\n chain input {{\n  type filter hook input priority 0;"
                       f" policy accept;\n  iifname \"lo\" accept\n }}\n}}\n")
        script += f"add rule inet {NFT_TABLE} input {source}tcp dport {match} drop\n"
        self._nft_run(script)
        self._nft = True

    def unblock_inbound(self) -> None:
        """Remove every block :meth:`block_inbound` added (a no-op when there is none)."""
        if self._nft:
            self._nft_run(f"delete table inet {NFT_TABLE}\n")
            self._nft = False

    def can_connect(self, ip: str, port: int, timeout_s: float = 2) -> bool:
        """Whether a TCP connection from this host to ``ip:port`` opens within ``timeout_s``."""
        code = ("import socket,sys\n"
                f"try: socket.create_connection(({ip!r}, {int(port)}), timeout={float(timeout_s)}).close()\n"
                "except OSError: sys.exit(1)\n")
        try:
            return self.run([sys.executable, "-c", code], timeout_s=timeout_s + 10, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False


class Topology:
    """Hosts on one bridge, each in its own network namespace; a context manager.

    ``with Topology() as topo: topo["miner1"].popen([...])``. ``root`` holds the hosts' home
    directories (default: a new temp folder, removed at teardown; a given ``root`` is kept).
    ``stop_grace_s``: how long a process gets between SIGTERM and SIGKILL at teardown.
    """

    def __init__(self, hosts=("validator", "miner1", "miner2", "user"), *, root: Path | None = None,
                 stop_grace_s: float = 5.0):
        names = list(hosts)
        for name in names:
            if not re.fullmatch(r"[A-Za-z0-9_]{1,12}", name) or name == BRIDGE_NS:
                raise ValueError(f"host name {name!r}: use 1-12 letters, digits or _ (and not {BRIDGE_NS!r})")
        if len(set(names)) != len(names) or not 1 <= len(names) <= 200:
            raise ValueError(f"host names must be unique, 1 to 200 of them: {names}")
        self.names = names
        self._given_root = Path(root) if root is not None else None
        self.root: Path | None = self._given_root
        self.stop_grace_s = stop_grace_s
        self.tag = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: dict[str, Host] = {}
        self._lock: _TagLock | None = None
        self._made_ns: list[str] = []
        self.build_s = self.teardown_s = 0.0

    @property
    def bridge_ns(self) -> str:
        return f"rh{self.tag}-{BRIDGE_NS}"

    @property
    def bridge(self) -> str:
        return f"rh{self.tag}br"

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> "Topology":
        problem = missing_requirements()
        if problem:
            raise RuntimeError(problem)
        started = time.monotonic()
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        self.build_s = time.monotonic() - started
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _claim_tag(self) -> None:
        taken = {m.group(1) for m in map(NS_PATTERN.match, _netns_list()) if m}
        for _ in range(100):
            tag = secrets.token_hex(2)
            if tag in taken:
                continue
            lock = _TagLock.try_acquire(tag)
            if lock is not None:
                self.tag, self._lock = tag, lock
                return
        raise RuntimeError(f"no free topology tag after 100 tries; run cleanup_stale() or look in {LOCK_DIR}")

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = _machine_networks() + _locked_subnets()
        rng = random.SystemRandom()
        for _ in range(1000):
            net = ipaddress.ip_network(f"10.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}.0/24")
            if not any(net.overlaps(u) for u in used):
                return net
        raise RuntimeError("no free 10.x.y.0/24 for a topology: every one overlaps a route on this machine")

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made_ns.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._claim_tag()
        self.subnet = self._pick_subnet()
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix=f"rh-topo-{self.tag}-"))
        # What cleanup_stale needs if this process dies: the subnet to avoid, the temp folder to remove
        self._lock.write({"pid": os.getpid(), "subnet": str(self.subnet), "hosts": self.names,
                          "temp_root": str(self.root) if self._given_root is None else None})
        self.root.mkdir(parents=True, exist_ok=True)
        atexit.register(self.teardown)  # a backstop if the owner exits without tearing down
        self._add_ns(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            home = self.root / name
            home.mkdir(parents=True, exist_ok=True)
            host = Host(self, name, i, str(self.subnet[i + 1]), home)
            self.hosts[name] = host
            self._add_ns(host.ns)
            # Both ends are born inside their namespaces: the machine's never sees either
            _ip("-n", self.bridge_ns, "link", "add", host.bridge_port, "type", "veth",
                "peer", "name", "eth0", "netns", host.ns)
            _ip("-n", self.bridge_ns, "link", "set", host.bridge_port, "master", self.bridge, "up")
            _ip("-n", host.ns, "addr", "add", f"{host.ip}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", host.ns, "link", "set", "eth0", "up")

    def _tracked(self) -> list[tuple[Host, subprocess.Popen]]:
        return [(h, p) for h in self.hosts.values() for p in h.procs]

    def teardown(self) -> None:
        """Stop every process, delete every namespace (their veths go with them), release the tag.
        Safe to call twice and after a failed build."""
        started = time.monotonic()
        tracked = self._tracked()
        for _, proc in tracked:
            _signal(proc.pid, signal.SIGTERM, group=True)
        deadline = time.monotonic() + self.stop_grace_s
        for _, proc in tracked:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for host, proc in tracked:
            _signal(proc.pid, signal.SIGKILL, group=True)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            else:
                host.procs.remove(proc)
        # Hosts first (their veths leave the bridge with them), the bridge namespace last
        for ns in sorted(self._made_ns, key=lambda n: n == self.bridge_ns):
            _empty_namespace(ns, grace_s=min(self.stop_grace_s, 2.0))
            out = _ip("netns", "del", ns, check=False)
            if out.returncode == 0 or ns not in _netns_list():
                self._made_ns.remove(ns)
        if self._lock is not None and not self._made_ns:
            self._lock.release()
            self._lock = None
        if self._given_root is None and self.root is not None and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.teardown)
        self.teardown_s = time.monotonic() - started

    def leftovers(self) -> list[str]:
        """What of this topology is still present: namespaces, links in the machine's namespace that
        carry its tag, processes it started, its lock file, its temp root. [] when clean."""
        if not self.tag:
            return []
        prefix = f"rh{self.tag}"
        left = [f"namespace {ns} (pids {_netns_pids(ns)})" for ns in _netns_list() if ns.startswith(prefix + "-")]
        for line in _ip("-o", "link").stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
            if prefix in name:
                left.append(f"link {name} in the machine's namespace")
        left += [f"process {p.pid} ({p.args[4:]}) of host {h.name}" for h, p in self._tracked() if p.poll() is None]
        if self._lock is not None or (LOCK_DIR / f"{self.tag}.lock").exists():
            left.append(f"lock file {LOCK_DIR / f'{self.tag}.lock'}")
        if self._given_root is None and self.root is not None and self.root.exists():
            left.append(f"temp folder {self.root}")
        return left
