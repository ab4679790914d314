"""rayhorde deployed on a :class:`~tests.support.topology.Topology`: each role started with its
own command (``rayhorde validator run`` / ``rayhorde miner run``) inside its own host, with its
own home, config file, wallet and TLS certificate; the user's side runs inside the ``user`` host
(:mod:`tests.support.topo_user`). Used by tests/topology and by the ``topo_*`` benchmarks.

The test process itself lives in the machine's namespace, which has no route into the topology:
it reads validator-core's SQLite file and the roles' logs (the hosts share the file system) and
asks the hosts to do everything that crosses the network.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from cluster.devstack.certs import make_ca
from cluster.fabric.ray_node import short_tmp
from cluster.protocol.identity import Hotkey, create_dev_wallet
from cluster.resources import config_path
from cluster.verification.cluster import VerificationCluster
from serve_apps.inference.model import default_cache_dir
from tests.support.topology import Host, Topology

REPO = Path(__file__).resolve().parents[2]
VALIDATOR_URI, USER_URI = "//Alice", "//Dave"
MINER_URIS = {"miner1": "//Bob", "miner2": "//Charlie"}
VALIDATOR_PORT, RAY_PORT_BASE, NODE_PORT_BASE, VERIFY_PORT_BASE = 8750, 30000, 31000, 24000
STREAM_CLASS = "always_on.cpu.8c.16gb"  # only miner1 offers it: streams land there
RAYHORDE = str(Path(sys.executable).with_name("rayhorde"))
# Each host's Ray processes run sandboxed as a user of their own (cluster/fabric/sandbox.py): the
# hosts share one kernel here, and one uid on two "hosts" would let them reach each other's
# processes (/proc/<pid>/root, ptrace) where separate machines could not.
RAY_USERS = {"validator": "61001:61001", "miner1": "61002:61002", "miner2": "61003:61003"}


def toml(values: dict[str, Any]) -> str:
    def enc(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {enc(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(enc(x) for x in v) + "]"
        return json.dumps(str(v))
    return "".join(f"{k} = {enc(v)}\n" for k, v in values.items())


class TopoStack:
    def __init__(self, topo: Topology, *, tls: bool = True, verification: bool = False,
                 validator: dict[str, Any] | None = None, sandbox: bool = True) -> None:
        self.topo = topo
        self.tls = tls
        self.sandbox = sandbox
        self.verification = verification
        self.validator_extra = validator or {}
        self.ca = make_ca(topo.root / "ca")
        self.procs: dict[str, Any] = {}
        # Ray temp dirs live outside the hosts' homes (unix socket paths are limited to 107 bytes)
        self.temp_dirs: list[Path] = []
        self.v = topo["validator"]
        scheme = "https" if tls else "http"
        self.validator_url = f"{scheme}://{self.v.ip}:{VALIDATOR_PORT}"
        self.validator_hotkey = Hotkey.from_uri(VALIDATOR_URI).ss58
        for host in topo.hosts.values():
            _share_model_cache(host)

    # ------------------------------------------------------------------ helpers
    def env(self, host: Host, **extra: str) -> dict[str, str]:
        return host.env(PYTHONPATH=str(REPO), RAYHORDE_CA_BUNDLE=str(self.ca.cert_path), HF_HUB_OFFLINE="1", **extra)

    def _tls(self, host: Host) -> dict[str, str]:
        if not self.tls:
            return {"ca_bundle_path": str(self.ca.cert_path)}
        cert, key = self.ca.issue(host.home / "tls", host.name, [host.ip])
        return {"tls_cert_path": str(cert), "tls_key_path": str(key), "ca_bundle_path": str(self.ca.cert_path)}

    def _ray_user(self, name: str) -> dict[str, str]:
        return {"ray_user": RAY_USERS[name]} if self.sandbox else {}

    def ray_temp(self, name: str) -> str:
        """The Ray temp dir of host ``name``'s node (the head's: ``head``)."""
        path = Path(f"/tmp/rh-{self.topo.tag}-{name}")
        if path not in self.temp_dirs:
            self.temp_dirs.append(path)
        return str(path)

    @property
    def metagraph(self) -> Path:
        return self.v.home / "metagraph.json"

    def deregister(self, name: str) -> None:
        """Take miner ``name`` off the subnet, as the chain would (the local chain is a file)."""
        mg = json.loads(self.metagraph.read_text())
        gone = Hotkey.from_uri(MINER_URIS[name]).ss58
        mg["neurons"] = [n for n in mg["neurons"] if n["hotkey"] != gone]
        tmp = self.metagraph.with_suffix(".tmp")
        tmp.write_text(json.dumps(mg))
        tmp.replace(self.metagraph)  # whole or not at all: a reader never sees half a file

    def token(self) -> str:
        return (self.v.home / "validator" / "ray_token").read_text().strip()

    def db(self) -> sa.Engine:
        return sa.create_engine(f"sqlite:///{self.v.home / 'validator' / 'validator.db'}")

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.topo[name].home / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else f"(no log at {path})"

    def user(self, step: str, *args: Any, timeout_s: float = 600) -> dict[str, Any]:
        """Run one step of :mod:`tests.support.topo_user` in the user host; its last stdout line (JSON)."""
        u = self.topo["user"]
        out = u.run([sys.executable, "-m", "tests.support.topo_user", step, self.validator_url,
                     *[json.dumps(a) if not isinstance(a, str) else a for a in args]],
                    timeout_s=timeout_s, env=self.env(u), check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not lines:
            raise AssertionError(f"user step {step} failed (rc {out.returncode}):\n{out.stdout[-3000:]}\n"
                                 f"{out.stderr[-3000:]}")
        return json.loads(lines[-1])

    # ------------------------------------------------------------------ roles
    def start_validator(self, timeout_s: float = 180) -> None:
        v = self.v
        home = v.home / "validator"
        home.mkdir(parents=True, exist_ok=True)
        create_dev_wallet(v.home / "wallets", "validator", VALIDATOR_URI)
        shutil.copy(config_path("metagraph.local.json"), self.metagraph)  # :meth:`deregister` edits it
        cfg = {"home": str(home), "wallet_path": str(v.home / "wallets"), "wallet_name": "validator",
               "host": v.ip, "port": VALIDATOR_PORT, "ray_node_ip": v.ip, "ray_port_base": RAY_PORT_BASE,
               "metagraph_path": str(self.metagraph), "firewall": "nftables",
               "users": [Hotkey.from_uri(USER_URI).ss58],
               "heartbeat_interval_s": 1, "heartbeat_timeout_s": 6, "head_num_cpus": 1,
               "ray_temp_dir": self.ray_temp("head"), **self._tls(v), **self._ray_user("validator")}
        if self.verification:
            cfg.update(self._start_verification())
        cfg.update(self.validator_extra)
        (v.home / "validator.toml").write_text(toml(cfg))
        self.procs["validator"] = v.popen([RAYHORDE, "validator", "run", "--config", str(v.home / "validator.toml")],
                                          env=self.env(v), log=v.home / "validator.log")
        self.wait(lambda: self.user("health", timeout_s=30).get("ok"), timeout_s, "validator-core to answer",
                  "validator")

    def _start_verification(self) -> dict[str, Any]:
        """The validator's private verification cluster, on the validator host's loopback."""
        v = self.v
        folder = v.home / "verification"
        script = ("import json, sys; from cluster.verification.cluster import VerificationCluster as V; "
                  f"vc = V({str(folder)!r}, port_base={VERIFY_PORT_BASE}); vc.start(); "
                  "open(sys.argv[1], 'w').write(vc.token); print(json.dumps({'gcs': vc.gcs_address}))")
        folder.mkdir(parents=True, exist_ok=True)
        self.temp_dirs.append(Path(short_tmp(folder, "verif")))  # VerificationCluster's own naming
        token_path = folder / "ray_token"
        out = v.run([sys.executable, "-c", script, str(token_path)], timeout_s=240, env=self.env(v))
        token_path.chmod(0o600)
        return {"verification_address": json.loads(out.stdout.splitlines()[-1])["gcs"],
                "verification_token_path": str(token_path)}

    def miner_config(self, name: str, **extra: Any) -> Path:
        m = self.topo[name]
        create_dev_wallet(m.home / "wallets", name, MINER_URIS[name])
        classes = {"always_on.test": 1, **({STREAM_CLASS: 1} if name == "miner1" else {})}
        cfg = {"name": name, "home": str(m.home / "agent"), "wallet_path": str(m.home / "wallets"),
               "wallet_name": name, "validator_url": self.validator_url, "validator_hotkey": self.validator_hotkey,
               "executor_classes": classes, "node_port_base": NODE_PORT_BASE, "ray_node_ip": m.ip,
               "proxy_host": m.ip, "num_cpus": 1, "object_store_mb": 80,
               "ray_temp_dir": self.ray_temp(name), "docker_host": "unix:///run/rayhorde-docker.sock",
               **self._tls(m), **self._ray_user(name), **extra}
        path = m.home / "miner.toml"
        path.write_text(toml(cfg))
        return path

    def start_miner(self, name: str, timeout_s: float = 180) -> None:
        m = self.topo[name]
        config = self.miner_config(name)
        self.procs[name] = m.popen([RAYHORDE, "miner", "run", "--config", str(config)], env=self.env(m),
                                   log=m.home / f"{name}.log")
        hotkey = Hotkey.from_uri(MINER_URIS[name]).ss58
        self.wait(lambda: self.node_of(hotkey), timeout_s, f"{name} to join", name)

    def node_of(self, hotkey: str) -> str | None:
        """The Ray node id validator-core recorded for ``hotkey`` (None before it joined)."""
        path = self.v.home / "validator" / "validator.db"
        if not path.exists():
            return None
        engine = self.db()
        try:
            with engine.connect() as conn:
                from cluster.validator import store as db
                row = conn.execute(sa.select(db.miners.c.node_id).where(db.miners.c.hotkey == hotkey)).first()
        except sa.exc.OperationalError:  # the schema is not there yet
            return None
        finally:
            engine.dispose()
        return row.node_id if row else None

    def wait(self, ready, timeout_s: float, what: str, log_of: str) -> Any:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            proc = self.procs.get(log_of)
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{log_of} exited with {proc.returncode}:\n{self.log(log_of)}")
            try:
                value = ready()
                if value:
                    return value
            except AssertionError as exc:
                last = exc
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} ({last}):\n{self.log(log_of)}")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            self.topo[name].stop(proc, grace_s=30)

    def close(self) -> list[str]:
        """Stop every role (miners first), remove the Ray temp dirs; what is left of them."""
        for name in [n for n in self.procs if n != "validator"] + ["validator"]:
            self.stop(name)
        state = self.v.home / "verification" / "verification-cluster.json"
        if self.verification and state.exists():
            # it outlives the script that started it; its processes would write into the temp
            # dir while it is removed (CI once saw /tmp/rh-*-verif left behind)
            VerificationCluster.stop_recorded(state)
        for path in self.temp_dirs:
            shutil.rmtree(path, ignore_errors=True)
        return [str(p) for p in self.temp_dirs if p.exists()]


def _share_model_cache(host: Host) -> None:
    """Each host has its own HOME; the model folder (~540 MB) is linked, not copied."""
    src = default_cache_dir()
    dst = host.home / ".cache" / "rayhorde" / "models"
    if src.exists() and not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst)
