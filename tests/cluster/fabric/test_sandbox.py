"""The sandbox of Ray processes (cluster/fabric/sandbox.py), entered by a small child process as a
Ray node's launcher enters it: what it shows, what it hides, who it runs as. Needs root (the
sandbox switches users and builds a mount namespace); Ray itself runs sandboxed in
tests/topology (test_sandbox.py and every flow of test_across_hosts.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.errors import ConfigError
from cluster.fabric import sandbox
from cluster.resources import package_root

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root to switch users")
UID, GID = 61050, 61050

CHILD = r"""
import errno, json, os, sys
from cluster.fabric import sandbox
sandbox.enter(sandbox.SandboxSpec.model_validate_json(sys.argv[1]))

def attempt(fn):
    try:
        return "ok: " + str(fn())
    except OSError as exc:
        return "refused: " + errno.errorcode.get(exc.errno, str(exc.errno))

def write(path):
    with open(path, "w") as f:
        f.write("x")
    return os.stat(path).st_uid

checks = json.loads(sys.argv[2])
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "home": os.environ["HOME"],
       "user": os.environ["USER"], "cwd": os.getcwd(), "shm": sorted(os.listdir("/dev/shm"))}
for name, path in checks["read"].items():
    out[name] = attempt(lambda: open(path, "rb").read().decode())
for name, path in checks["write"].items():
    out[name] = attempt(lambda: write(path))
out["remount"] = attempt(lambda: os.system("mount -o remount,rw / 2>/dev/null") or "mounted")
print(json.dumps(out))
"""


def _run(spec: sandbox.SandboxSpec, cwd: Path, read: dict, write: dict) -> dict:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package_root()), "HOME": "/root"}
    out = subprocess.run([sys.executable, "-c", CHILD, spec.model_dump_json(), json.dumps({"read": read, "write": write})],
                         capture_output=True, text=True, timeout=60, cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@needs_root
def test_only_the_shown_paths_exist_and_the_process_is_the_ray_user(tmp_path):
    secret = tmp_path / "wallets" / "miner" / "hotkeys" / "default"
    secret.parent.mkdir(parents=True)
    secret.write_text("the miner's key")
    shown = tmp_path / "models" / "weights.txt"
    shown.parent.mkdir()
    shown.write_text("weights")
    node = Path(f"/tmp/rh-sbx-test-{os.getpid()}")  # a node's temp dir: short, under /tmp
    cwd = node / "cwd"
    shm = Path(f"/dev/shm/rh-sbx-test-{os.getpid()}")
    shm.write_text("another node's shared memory")
    try:
        spec = sandbox.SandboxSpec(uid=UID, gid=GID, user="raytest", home=str(node / "home"),
                                   read_only=[sys.base_prefix, sys.prefix, str(package_root()), str(shown.parent)],
                                   writable=[str(node), str(cwd)])
        cwd.mkdir(parents=True)
        (node / "left-by-root").write_text("a previous run's file")  # chowned to the ray user on entry
        got = _run(spec, cwd, read={"wallet": str(secret), "model": str(shown), "shadow": "/etc/shadow",
                                    "left": str(node / "left-by-root")},
                   write={"temp": str(node / "t.txt"), "cwd_file": str(cwd / "out.txt"),
                          "model_dir": str(shown.parent / "new.txt"), "usr": "/usr/evil"})
    finally:
        shm.unlink()
        subprocess.run(["rm", "-rf", str(node)], check=True)
    assert (got["uid"], got["gid"], got["groups"]) == (UID, GID, [GID])
    assert (got["user"], got["home"], got["cwd"]) == ("raytest", str(node / "home"), str(cwd))
    assert got["wallet"] == "refused: ENOENT"  # not in the view at all
    assert got["shadow"] == "refused: EACCES"  # /etc is shown, its root-only files stay root's
    assert got["model"] == "ok: weights" and got["left"] == "ok: a previous run's file"
    assert got["temp"] == f"ok: {UID}" and got["cwd_file"] == f"ok: {UID}"
    assert got["model_dir"] == "refused: EROFS" and got["usr"] in ("refused: EROFS", "refused: EACCES")
    assert shm.name not in got["shm"]  # a /dev/shm of its own
    assert got["remount"] != "ok: mounted"  # no capability left to undo the view


def test_ray_user_is_a_name_of_this_host_or_numbers_never_root():
    assert sandbox.resolve_user("61001:61002") == (61001, 61002, "ray61001")
    with pytest.raises(ConfigError, match="useradd"):
        sandbox.resolve_user("no-such-user-rh")
    with pytest.raises(ConfigError, match="root"):
        sandbox.resolve_user("root")
    with pytest.raises(ConfigError, match="uid:gid"):
        sandbox.resolve_user("a:b")
    assert sandbox.spec_for(None, home="/tmp/x", writable=["/tmp/x"]) is None  # the dev stack: no sandbox


def test_a_ray_user_set_while_not_root_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="not root"):
        sandbox.spec_for("61001:61001", home="/tmp/x", writable=["/tmp/x"])
