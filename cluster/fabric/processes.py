"""The process table (through psutil): which processes are ours, whether they are alive, and
stopping them by PID.

Rules every caller relies on:

* A process is its pid AND its start time (:func:`started`: seconds since boot, in the kernel's
  clock ticks, so a change of the wall clock never changes it). A recorded pid whose start time
  differs now belongs to another process: it is never signalled.
* A zombie counts as gone: it holds no resources, and here PID 1 reaps orphans only every ~1 s.
* Nothing is ever found or stopped by name (Ray renames its workers ``ray::IDLE``,
  ``ray::VerifierActor``...), and never this process or one of its ancestors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import psutil


@dataclass(frozen=True)
class Proc:
    """One row of the process table."""

    pid: int
    ppid: int
    started: float  # seconds since boot (see the module docstring)
    zombie: bool


def started(p: psutil.Process) -> float:
    """``p``'s start time in seconds since boot. psutil's ``create_time`` adds the boot time read
    from the wall clock; subtracting it at once (two reads microseconds apart) and rounding to the
    kernel's 0.01 s ticks gives the same number for the same process in any process, any time."""
    return round(p.create_time() - psutil.boot_time(), 2)


def look(pid: int) -> Proc | None:
    """The table row of ``pid``, or None when there is no such process."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return Proc(pid, p.ppid(), started(p), p.status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return None


def command_line(pid: int) -> str:
    """``pid``'s command line, arguments joined by spaces; "" when it is gone or unreadable."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def table() -> dict[int, Proc]:
    """Every process on this host right now (fresh reads: nothing cached between calls)."""
    out = {}
    for pid in psutil.pids():
        row = look(pid)
        if row is not None:
            out[pid] = row
    return out


def alive(pid: int, start: float | None = None) -> bool:
    """``pid`` runs and is not a zombie (and, given ``start``, is the process that started then)."""
    row = look(pid)
    return row is not None and not row.zombie and (start is None or row.started == start)


def live(recorded: dict[int, float]) -> set[int]:
    """The recorded processes (pid -> start time) still alive."""
    rows = table()
    return {p for p, s in recorded.items() if p in rows and rows[p].started == s and not rows[p].zombie}


def descendants(pid: int, rows: dict[int, Proc] | None = None) -> dict[int, float]:
    """pid -> start time of every live descendant of ``pid`` (a zombie's children are not followed)."""
    rows = table() if rows is None else rows
    children: dict[int, list[Proc]] = {}
    for row in rows.values():
        children.setdefault(row.ppid, []).append(row)
    out: dict[int, float] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child.pid not in out and not child.zombie:
                out[child.pid] = child.started
                todo.append(child.pid)
    return out


def process_tree(pids: Iterable[int]) -> set[int]:
    """``pids`` that are alive, with every live descendant of each."""
    rows = table()
    out: set[int] = set()
    for pid in pids:
        if pid in rows and not rows[pid].zombie:
            out.add(pid)
            out.update(descendants(pid, rows))
    return out


def lineage() -> set[int]:
    """This process and its ancestors: never to be found as anyone's leftovers."""
    rows, out, pid = table(), set(), os.getpid()
    while pid in rows and pid not in out and pid > 1:
        out.add(pid)
        pid = rows[pid].ppid
    return out


def group_alive(pgid: int) -> bool:
    """Some member of process group ``pgid`` is alive (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's group: it exists, look at its members
        pass
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def find_by_folder(folder: str, roots: Iterable[int] = ()) -> dict[int, float]:
    """pid -> start time of every live process of this user that descends from ``roots`` or whose
    working directory, command line or an open file lies under ``folder``; never this process or
    its ancestors. How a cluster finds its processes after they renamed or reparented themselves."""
    rows, exclude, uid = table(), lineage(), os.getuid()
    found: dict[int, float] = {}
    for root in roots:
        if root in rows and not rows[root].zombie:
            found[root] = rows[root].started
        found.update(descendants(root, rows))
    marker = folder.rstrip("/") + "/"
    for pid, row in rows.items():
        if pid in found or pid in exclude or row.zombie:
            continue
        try:
            p = psutil.Process(pid)
            if p.uids().real != uid or started(p) != row.started:
                continue
            if (_under(p.cwd(), folder) or any(marker in arg for arg in p.cmdline())
                    or any(_under(f.path, folder) for f in p.open_files())):
                found[pid] = row.started
        except psutil.Error:
            continue
    return found


def wait_until(done: Callable[[], bool], seconds: float, poll_s: float = 0.1) -> bool:
    """Poll ``done`` for up to ``seconds``; returns its last answer."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_one(proc: subprocess.Popen | int, timeout_s: float, start: float | None = None) -> None:
    """SIGTERM one process and wait for IT (not its group) to exit; SIGKILL after ``timeout_s``.
    Given a pid, ``start`` guards against a reused pid."""
    pid = proc.pid if isinstance(proc, subprocess.Popen) else proc

    def gone() -> bool:
        if isinstance(proc, subprocess.Popen):
            return proc.poll() is not None
        return not alive(pid, start)

    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        if gone():
            return
        signal_pid(pid, sig)
        wait_until(gone, wait_s)


def kill_recorded(recorded: dict[int, float], rescan: Callable[[], dict[int, float]],
                  grace_s: float = 1.5, rounds: int = 5) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, every recorded process still alive (same start
    time), then ask ``rescan`` for late ones (adding them to ``recorded``) until none is left."""
    for _ in range(rounds):
        left = live(recorded)
        if not left:
            found = rescan()
            if not found:
                return
            recorded.update(found)
            continue
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 3.0)):
            for pid in left:
                signal_pid(pid, sig)
            wait_until(lambda: not (left & live(recorded)), wait_s)
            left &= live(recorded)
            if not left:
                break
