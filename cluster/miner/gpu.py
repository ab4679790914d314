"""Whether this miner may run GPU jobs: only with an NVIDIA container toolkit of at least 1.17.8.

Older toolkits have known container escapes (CVE-2024-0132 fixed in 1.16.2, CVE-2025-23359 in
1.17.4, CVE-2025-23266 "NVIDIAScape" in 1.17.8), and a GPU run goes through the toolkit: every
binary of it on PATH is asked for its version and the oldest one counts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from typing import NamedTuple

from cluster.errors import GpuUnsupported

MIN_TOOLKIT_VERSION = (1, 17, 8)

# Each binary of the toolkit a docker `device_requests` run goes through; the oldest one found counts.
TOOLKIT_PROBES = ("nvidia-ctk", "nvidia-container-toolkit", "nvidia-container-runtime-hook", "nvidia-container-cli")


class ToolkitVersion(NamedTuple):
    major: int
    minor: int
    patch: int
    pre: str = ""  # "rc.1" for 1.17.8-rc.1: a pre-release is older than its release

    def at_least(self, minimum: tuple[int, ...]) -> bool:
        base = (self.major, self.minor, self.patch)
        want = tuple(minimum) + (0,) * (3 - len(minimum))
        return base > want if self.pre else base >= want

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}" + (f"-{self.pre}" if self.pre else "")


_VERSION = re.compile(r"version:?\s+v?(\d+)\.(\d+)\.(\d+)(?:[-~+]?((?:rc|alpha|beta|dev|pre)[\w.]*))?", re.I)


def parse_toolkit_version(text: str) -> ToolkitVersion | None:
    """``NVIDIA Container Toolkit CLI version 1.17.8`` / ``cli-version: 1.17.8`` → (1, 17, 8)."""
    m = _VERSION.search(text or "")
    if m is None:
        return None
    return ToolkitVersion(int(m[1]), int(m[2]), int(m[3]), (m[4] or "").lower())


def toolkit_versions() -> dict[str, ToolkitVersion | None]:
    """``{path: version or None if unreadable}`` for each toolkit binary on PATH."""
    found: dict[str, ToolkitVersion | None] = {}
    for name in TOOLKIT_PROBES:
        path = shutil.which(name)
        if path is None or path in found:
            continue
        try:
            proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                                  stdin=subprocess.DEVNULL)
            found[path] = parse_toolkit_version(proc.stdout + "\n" + proc.stderr)
        except (OSError, subprocess.SubprocessError):
            found[path] = None
    return found


def _oldest(versions) -> ToolkitVersion:
    return min(versions, key=lambda v: ((v.major, v.minor, v.patch), 0 if v.pre else 1))


def nvidia_toolkit_version() -> ToolkitVersion | None:
    """The oldest readable NVIDIA container toolkit version on PATH, or None if none is installed."""
    versions = [v for v in toolkit_versions().values() if v is not None]
    return _oldest(versions) if versions else None


def check_gpu_support(min_version: tuple[int, ...] = MIN_TOOLKIT_VERSION, *,
                      probe: Callable[[], dict[str, ToolkitVersion | None]] = toolkit_versions) -> ToolkitVersion:
    """Return the toolkit version, or raise :class:`GpuUnsupported` (missing / too old)."""
    minimum = ".".join(map(str, min_version))
    found = probe()
    readable = {path: v for path, v in found.items() if v is not None}
    if not readable:
        where = (f"found {', '.join(found)} but could not read a version from it" if found
                 else f"none of {', '.join(TOOLKIT_PROBES)} is on PATH")
        raise GpuUnsupported("gpu_toolkit_missing", f"this miner cannot run GPU jobs: the NVIDIA container toolkit "
                             f"is not installed ({where}); install nvidia-container-toolkit >= {minimum} and "
                             "configure docker for it")
    old = {path: v for path, v in readable.items() if not v.at_least(min_version)}
    if old:
        listed = ", ".join(f"{path} {v}" for path, v in old.items())
        raise GpuUnsupported("gpu_toolkit_too_old", f"this miner refuses GPU jobs: NVIDIA container toolkit {listed} "
                             f"is older than {minimum}, below which containers can escape to the host "
                             f"(CVE-2025-23266 and earlier); upgrade nvidia-container-toolkit to >= {minimum}")
    return _oldest(readable.values())
