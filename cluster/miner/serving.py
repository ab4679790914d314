"""An HTTP app served by uvicorn in a daemon thread of the agent: the executor API (on a unix
socket) and the miner proxy (on a TCP port) both run this way, beside the agent's main loop.

uvicorn installs signal handlers only in the main thread, so the agent keeps its own.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path

import uvicorn

from cluster.errors import ConfigError


class BackgroundServer:
    def __init__(self, app, *, name: str, ssl_certfile: str | Path | None = None,
                 ssl_keyfile: str | Path | None = None, **config) -> None:
        """``name`` says what it is in errors; ``ssl_certfile`` and ``ssl_keyfile`` (both or
        neither) make it serve HTTPS; ``config`` is uvicorn's (``uds=`` or ``host=``/``port=``, ...)."""
        self.name = name
        if ssl_certfile or ssl_keyfile:
            _check_tls_pair(name, ssl_certfile, ssl_keyfile)
            config.update(ssl_certfile=str(ssl_certfile), ssl_keyfile=str(ssl_keyfile))
            # an idle keep-alive client (a user's streaming client keeps one per proxy) never answers
            # the TLS close_notify of a stopping server, and asyncio waits 30 s for it: bound the wait
            config.setdefault("timeout_graceful_shutdown", 3)
            logging.getLogger("uvicorn.error").addFilter(_idle_cut_only)
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


def _check_tls_pair(name: str, certfile: str | Path | None, keyfile: str | Path | None) -> None:
    """Load the pair now: uvicorn would load it in the server's thread, where a bad file only
    shows as a server that never started."""
    if not certfile or not keyfile:
        raise ConfigError(f"{name}: TLS needs both a certificate and its key (got certificate {certfile}, key "
                          f"{keyfile}); set tls_cert_path and tls_key_path together, or neither for plain HTTP")
    for what, path in (("certificate", certfile), ("key", keyfile)):
        if not Path(path).is_file():
            raise ConfigError(f"{name}: the TLS {what} {path} is not a file; fix tls_cert_path / tls_key_path")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(certfile), str(keyfile))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{name}: cannot load the TLS certificate {certfile} with key {keyfile} ({exc}); they must "
                          "be PEM files and the key must be the certificate's") from exc


def _idle_cut_only(record: logging.LogRecord) -> bool:
    """Drop uvicorn's "Cancel 0 running task(s)" error: with no task cancelled, the graceful
    shutdown timeout only cut idle TLS connections, which is no error."""
    return not (record.msg.startswith("Cancel %s running task") and record.args == (0,))
