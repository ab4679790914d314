"""An HTTP app served by uvicorn in a daemon thread of the agent: the executor API (on a unix
socket) and the miner proxy (on a TCP port) both run this way, beside the agent's main loop.

uvicorn installs signal handlers only in the main thread, so the agent keeps its own.
"""

from __future__ import annotations

import threading
import time

import uvicorn


class BackgroundServer:
    def __init__(self, app, *, name: str, **config) -> None:
        """``name`` says what it is in errors; ``config`` is uvicorn's (``uds=`` or ``host=``/``port=``, ...)."""
        self.name = name
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, **config))
        self.thread = threading.Thread(target=self.server.run, name=name, daemon=True)

    def start(self, timeout_s: float = 15) -> None:
        """Start serving; return once it listens, or raise RuntimeError."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start within {timeout_s:g} s; its log above says why")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
