"""The versions a miner must share with its validator (checked at admission)."""

import platform

import ray

RAYHORDE_VERSION = "0.1.0"


def local_versions() -> dict[str, str]:
    """rayhorde, Ray and Python (major.minor) versions of this process."""
    return {
        "rayhorde": RAYHORDE_VERSION,
        "ray": ray.__version__,
        "python": ".".join(platform.python_version_tuple()[:2]),
    }
