"""Streaming: whitelisted Ray Serve apps behind the miner's proxy (issue 4; wire formats so far)."""

from serve_apps.api import *  # noqa: F401,F403
from serve_apps.api import __all__  # noqa: F401
