"""Streaming: whitelisted Ray Serve apps behind the miner's proxy, every answer signed; the client
that deploys, calls and verifies them."""

from serve_apps.api import *  # noqa: F401,F403
from serve_apps.api import __all__  # noqa: F401
