"""The sandbox every Ray process of a deployed host runs in: its own mount namespace that shows
only what Ray needs, as an unprivileged OS user.

Any cluster member can run code on any node (a task pinned to it, a Jobs entrypoint on the head),
so what such code can touch is exactly what the node's processes can touch. The launcher
(``ray_node head|worker --sandbox JSON``) enters the sandbox before it imports Ray; every Ray
process it starts (GCS, raylet, dashboard, workers, Serve replicas, drivers) inherits it.

What the view holds (everything else on the host, wallets, validator-core's database and
secrets, the verification cluster's token, the container engine socket, other nodes' and jobs'
files, is simply absent):

* read-only: the system (``/usr``, ``/etc``; ``/bin``, ``/lib``... as the symlinks or folders they
  are), the Python installation and the venv, the folder holding rayhorde's packages, and the
  extra paths of the spec (the model cache, a CA bundle, the agent's executor socket folder);
* read-write, owned by the sandbox user: the node's temp dir (its HOME and TMPDIR too) and the
  working directory tasks run in;
* ``/proc`` and ``/dev`` of the host, ``/sys`` read-only, and a ``/dev/shm`` of its own (other
  nodes' shared memory is not visible).

Why a mount namespace and a user, not the user alone: ``/root`` holds the Python installation
here, the venv and the model may sit where the user cannot read, and a user split alone leaves
readable whatever the host happens to leave world-readable (configs, a CA key, another job's
upload). Why not bubblewrap: it keeps a monitor process as the sandbox's parent, which breaks
``stop_process``'s leader-first SIGTERM (the node tears itself down in order only when its
launcher gets the signal) and the recorded node pid; entering in-process keeps one process.
The user switch (``setresuid`` after ``PR_SET_NO_NEW_PRIVS``) drops every capability, so nothing
in the sandbox can undo the mounts; ``/proc/<pid>`` of other users' processes stays closed by the
kernel's ptrace check (give each host of one kernel its own uid).
"""
from __future__ import annotations

import ctypes
import os
import pwd
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import ConfigError
from cluster.resources import package_root
from cluster.settings import default_model_cache

# The system, as every process needs it; each is bound when it exists (a symlink such as Debian's
# /lib -> usr/lib is recreated as the same symlink).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Folders of /etc that hold secrets of the host's roles, hidden under an empty folder.
HIDDEN_ETC = ("/etc/rayhorde", "/etc/ssl/private")
MOUNT_POINT = "/run/rayhorde-sandbox"  # where the new root is built (in the private namespace only)

_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND = 1, 2, 4, 32, 4096
_MS_REC, _MS_PRIVATE = 16384, 1 << 18
_MNT_DETACH = 2
_PR_SET_NO_NEW_PRIVS = 38
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)  # glibc has no wrapper
_libc = ctypes.CDLL(None, use_errno=True)


class SandboxSpec(BaseModel):
    """What a Ray node's launcher is told on its command line (``--sandbox``): who to become and
    which paths, besides the system's and Python's, to show."""

    model_config = ConfigDict(extra="forbid")
    uid: int = Field(gt=0)
    gid: int = Field(gt=0)
    user: str = Field(default="rayhorde-ray", pattern=r"^[A-Za-z0-9_.-]{1,32}$")  # USER / LOGNAME inside
    home: str  # HOME inside: a folder under one of ``writable``
    read_only: list[str] = []
    writable: list[str] = []


def resolve_user(ray_user: str) -> tuple[int, int, str]:
    """``ray_user`` from a config: a user name of this host, or ``uid:gid`` (numbers need no
    passwd entry: test hosts of one kernel each get their own). Root is refused: it is what the
    sandbox exists to leave."""
    if ":" in ray_user:
        uid_s, _, gid_s = ray_user.partition(":")
        try:
            uid, gid, name = int(uid_s), int(gid_s), f"ray{uid_s}"
        except ValueError:
            raise ConfigError(f"ray_user {ray_user!r}: use a user name or numeric uid:gid") from None
    else:
        try:
            entry = pwd.getpwnam(ray_user)
        except KeyError:
            raise ConfigError(f"ray_user {ray_user!r} is not a user of this host: create it "
                              f"(useradd --system --no-create-home {ray_user}) or give uid:gid") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, ray_user
    if uid <= 0 or gid <= 0:
        raise ConfigError(f"ray_user {ray_user!r} is root: Ray processes must run unprivileged")
    return uid, gid, name


def spec_for(ray_user: str | None, *, home: str, writable: list[str], read_only: list[str] = ()) -> SandboxSpec | None:
    """The sandbox for a node, or None when ``ray_user`` is unset (the one-machine dev stack).
    Needs root: only root can switch users and build mount namespaces."""
    if not ray_user:
        return None
    uid, gid, name = resolve_user(ray_user)
    if os.geteuid() != 0:
        raise ConfigError(f"ray_user {ray_user!r} is set but this process is not root: start the role as "
                          "root (it drops to ray_user for every Ray process) or unset ray_user")
    shown = [sys.base_prefix, sys.prefix, str(package_root()), str(default_model_cache()), *read_only]
    return SandboxSpec(uid=uid, gid=gid, user=name, home=home, read_only=shown, writable=list(writable))


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sandbox: {what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} on {target}")


def _bind(source: str, target: str, *, read_only: bool, recursive: bool = False) -> None:
    _mount(source, target, None, _MS_BIND | (_MS_REC if recursive else 0))
    if read_only:  # a bind mount takes the flags only on a remount
        _mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _mount_point(root: str, path: str, is_dir: bool) -> str:
    target = root + path
    if is_dir:
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    return target


def _chown_tree(path: str, uid: int, gid: int) -> None:
    """The sandbox user owns its writable folders (a previous run may have left root's files)."""
    os.chown(path, uid, gid)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(folder, name), uid, gid)


def _shown(paths: list[str]) -> list[str]:
    """Existing absolute paths, each once, parents before children, a path under one already
    shown dropped (its parent's bind shows it)."""
    out: list[str] = []
    for p in sorted({os.path.abspath(p) for p in paths if p and os.path.exists(p)}):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def enter(spec: SandboxSpec) -> None:
    """Move this (single-threaded, root) process into the sandbox: build the view, pivot into it,
    become ``spec``'s user. Call before starting any thread or importing Ray."""
    for path in spec.writable:
        os.makedirs(path, exist_ok=True)
        _chown_tree(path, spec.uid, spec.gid)
    cwd = os.getcwd()
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing mounted here reaches the host
    os.makedirs(MOUNT_POINT, exist_ok=True)
    root = MOUNT_POINT
    _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            _bind(path, _mount_point(root, path, True), read_only=True, recursive=True)
    for path in HIDDEN_ETC:  # root's empty folder: a shown file under it (the CA bundle) is bound below
        if os.path.isdir(path):
            _mount("tmpfs", root + path, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")

    def system_shows(p: str) -> bool:
        return (any(p == s or p.startswith(s + "/") for s in SYSTEM_PATHS)
                and not any(p == h or p.startswith(h + "/") for h in HIDDEN_ETC))

    for path in [p for p in _shown(spec.read_only) if not system_shows(p)]:
        _bind(path, _mount_point(root, path, os.path.isdir(path)), read_only=True)
    for path in _shown(spec.writable):
        _bind(path, _mount_point(root, path, True), read_only=False)
    for path in ("/proc", "/dev"):
        _bind(path, _mount_point(root, path, True), read_only=False, recursive=True)
    _mount("tmpfs", root + "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
    _bind("/sys", _mount_point(root, "/sys", True), read_only=True, recursive=True)
    os.makedirs(root + "/tmp", exist_ok=True)
    os.chmod(root + "/tmp", 0o1777)
    os.chdir(root)
    if _SYS_PIVOT_ROOT is None:
        raise OSError(f"sandbox: pivot_root's syscall number on {os.uname().machine} is not known here")
    _check(_libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")  # the old root is stacked on /
    _check(_libc.umount2(b".", _MNT_DETACH), "detach the old root")
    try:
        os.chdir(cwd)
    except OSError:  # a working directory the view does not show: start at home
        os.makedirs(spec.home, exist_ok=True)
        os.chdir(spec.home)
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.setgroups([spec.gid])
    os.setresgid(spec.gid, spec.gid, spec.gid)
    os.setresuid(spec.uid, spec.uid, spec.uid)  # from root to a user: every capability is gone
    os.makedirs(spec.home, exist_ok=True)
    os.environ.update(HOME=spec.home, USER=spec.user, LOGNAME=spec.user)
