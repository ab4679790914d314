"""The agent's side of streaming jobs: the miner proxy (the only public door to them) and the
readiness it signs.

Each heartbeat answer lists the streams validator-core placed on this miner. For a new one the
keeper asks the app, over the node's loopback Serve proxy, for its job key (``GET
<prefix>/-/key``: generated inside the app, never leaving it), opens the route in the proxy, then
signs readiness {job_id, job_key, proxy_url} with the miner hotkey and posts it. A stream missing
from the answer is over (terminated, time limit, failed): its route closes and its open streams
end with an error. When the agent's Ray node dies every route closes at once, which is what
bounds how long a client can wait on a dead job (``main`` reports the node death itself to
validator-core as a fabric incident, not the miner's fault).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import httpx

from cluster.protocol.envelope import seal
from cluster.protocol.http import ServiceClient
from cluster.protocol.identity import Hotkey
from cluster.miner.proxy import JobRoute, MinerProxy
from cluster.miner.receipt_book import ReceiptBook
from cluster.miner.serving import BackgroundServer
from cluster.errors import Refused, ServiceUnavailable
from cluster.protocol.keys import PublicKey
from cluster.protocol.streams import READY_KIND, StreamAssignment, StreamReady, VolumeRead

log = logging.getLogger("rayhorde.agent")


class StreamKeeper:
    def __init__(self, hotkey: Hotkey, validator: ServiceClient, *, validator_hotkey: str, proxy_port: int,
                 proxy_url: str, serve_url: str, volumes_dir: Path, idle_timeout_s: float, max_skew_s: float,
                 volume_max_bytes: int, request_max_bytes: int = 2**20, receipts_path: Path | None = None,
                 ready_timeout_s: float = 600,
                 proxy_host: str = "127.0.0.1",
                 tls_cert_path: Path | None = None, tls_key_path: Path | None = None) -> None:
        """The proxy binds ``proxy_host:proxy_port`` (HTTPS with ``tls_cert_path`` and
        ``tls_key_path``) and is announced as ``proxy_url``; ``serve_url`` is the node's own Serve
        proxy, reached over plain HTTP on loopback (it never leaves the host); ``receipts_path`` the
        SQLite file that keeps answers until the validator pulled them (None: memory only)."""
        self.hotkey = hotkey
        self.validator = validator
        self.proxy_url = proxy_url
        self.serve_url = serve_url.rstrip("/")
        self.volumes_dir = volumes_dir
        self.max_skew_s = max_skew_s
        self.clock = time.time_ns
        self.ready_timeout_s = ready_timeout_s
        self.proxy = MinerProxy(hotkey, max_skew_s=max_skew_s, idle_timeout_s=idle_timeout_s,
                                validator_hotkey=validator_hotkey, volumes_dir=volumes_dir,
                                volume_max_bytes=volume_max_bytes, request_max_bytes=request_max_bytes,
                                book=ReceiptBook(receipts_path) if receipts_path else None)
        self.known: dict[str, StreamAssignment] = {}
        self._lock = threading.Lock()
        self._server = BackgroundServer(self.proxy.app, name=f"the miner proxy on {proxy_url}", host=proxy_host,
                                        port=proxy_port, ssl_certfile=tls_cert_path, ssl_keyfile=tls_key_path)

    def start(self, timeout_s: float = 15) -> None:
        self.volumes_dir.mkdir(parents=True, exist_ok=True)
        self._server.start(timeout_s)
        log.info("streaming proxy on %s", self.proxy_url)

    def stop(self) -> None:
        self.proxy.end_all("the miner agent is stopping")
        self._server.stop()
        self.proxy.book.close()  # kept answers stay on disk for the next run to serve

    def update(self, assignments: list[dict]) -> None:
        """Follow the streams validator-core says run here (from a heartbeat answer)."""
        current = {a.job_id: a for a in (StreamAssignment.model_validate(x) for x in assignments)}
        with self._lock:
            for job_id in set(self.known) - set(current):
                self.known.pop(job_id)
                self.proxy.end_job(job_id, "ended by validator-core (terminated, time limit or failed)")
                shutil.rmtree(self.volumes_dir / job_id, ignore_errors=True)
                log.info("streaming job %s ended", job_id)
            for job_id, a in current.items():
                if job_id not in self.known:
                    self.known[job_id] = a
                    threading.Thread(target=self._announce, args=(a,), name=f"ready-{job_id[:8]}",
                                     daemon=True).start()

    def read_volume(self, read: VolumeRead) -> bytes:
        """A file of a ready job's volume, for a request its job key signed (the executor API's
        ``/v1/stream-volume``); Refused names why not."""
        job = self.proxy.jobs.get(read.job_id)
        if job is None or job.ended is not None:
            raise Refused("unknown_job", f"no open streaming job {read.job_id} on this miner", status_code=404)
        if not job.job_key.verify(read.signed_bytes(), read.job_sig):
            raise Refused("bad_signature", f"the volume read is not signed by job {read.job_id}'s key",
                          status_code=403)
        skew_s = abs(self.clock() - read.t_ns) / 1e9
        if skew_s > self.max_skew_s:
            raise Refused("stale", f"the volume read is {skew_s:.1f} s off this host's clock; max skew "
                          f"{self.max_skew_s:g} s", status_code=403)
        try:
            return (self.volumes_dir / read.job_id / read.name).read_bytes()
        except OSError as exc:
            raise Refused("no_such_file", f"no file {read.name!r} in job {read.job_id}'s volume ({exc.strerror}): "
                          "put it there first through the miner proxy", status_code=404) from None

    def node_lost(self) -> None:
        """Our Ray node died: every stream on it is gone. Close them all now (clients get an error
        at once, not after an idle timeout); validator-core ends them on our node_lost report."""
        with self._lock:
            self.proxy.end_all("the miner's Ray node died")
            self.known.clear()

    def _announce(self, a: StreamAssignment) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"{self.serve_url}{a.route_prefix}/-/key"
        with httpx.Client(timeout=10) as http:
            while time.monotonic() < deadline:
                if self.known.get(a.job_id) is not a:
                    return  # ended before it was ready
                try:
                    resp = http.get(url)
                    if resp.status_code == 200:
                        info = resp.json()
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.3)
            else:
                log.error("streaming job %s: its app never answered %s", a.job_id, url)
                return
        if info.get("job_id") != a.job_id:
            log.error("streaming job %s: the app at %s answers for job %r", a.job_id, url, info.get("job_id"))
            return
        key = PublicKey.model_validate(info["job_key"])
        self.proxy.add_job(JobRoute(job_id=a.job_id, upstream=self.serve_url, client_keys=a.client_keys, job_key=key))
        ready = StreamReady(job_id=a.job_id, job_key=key, proxy_url=self.proxy_url,
                            weights_sha256=info.get("weights_sha256"))
        try:
            self.validator.post_signed(f"/v1/streams/{a.job_id}/ready", seal(self.hotkey, READY_KIND, ready))
            log.info("streaming job %s ready (job key %s...)", a.job_id, key.public[:16])
        except (Refused, ServiceUnavailable) as exc:
            log.error("streaming job %s: readiness refused: %s", a.job_id, exc)
            self.proxy.end_job(a.job_id, f"readiness refused: {exc}")
