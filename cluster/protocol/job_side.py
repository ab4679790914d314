"""What every whitelisted streaming app does for its job, whatever it serves: hold the job key
(generated inside the app, never leaving it), check each client envelope (the proxy checks it
too: a call that skips the proxy is refused here), and sign its half of each receipt (the miner
proxy counter-signs).

The job's half travels to the proxy as ``X-Rayhorde-Job-Receipt: base64({"body", "job_sig"})``
for buffered answers, or as a final SSE comment line ``: job-receipt <base64>``.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import json
import os
import sys
import time
from typing import Callable, Iterable

import httpx

from cluster.protocol.canonical import canonical_bytes
from cluster.protocol.client_envelope import MemoryNonces, RequestEnvelope, check_request
from cluster.protocol.jobs import AGENT_SOCKET_ENV
from cluster.protocol.keys import PublicKey, SigningKey
from cluster.protocol.receipts import ReceiptBody, ReceiptChain
from cluster.protocol.streams import VOLUME_READ_PATH, VolumeRead

_PR_SET_DUMPABLE = 4


def _undumpable() -> None:
    """Every Ray process of a node runs as one user: without this, a rival's task on the node could
    read the job key out of this process (``/proc/<pid>/mem``, ptrace). Not dumpable, the process's
    memory is closed to every user but root."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)

JOB_RECEIPT_HEADER = "X-Rayhorde-Job-Receipt"
SSE_JOB_PREFIX = b": job-receipt "


class JobSide:
    def __init__(self, job_id: str, miner_hotkey: str, client_keys: Iterable[PublicKey], *, max_skew_s: float = 5,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.job_id = job_id
        self.miner_hotkey = miner_hotkey
        self.client_keys = list(client_keys)
        self.max_skew_s = max_skew_s
        self.clock = clock
        _undumpable()
        self.key = SigningKey()
        self.chain = ReceiptChain()
        self.nonces = MemoryNonces(keep_s=4 * max_skew_s + 60)

    def read_volume(self, name: str, timeout_s: float = 30) -> bytes:
        """A file the client sent into this job's volume through the miner proxy, asked of the
        miner's agent over its executor socket with a request signed by the job key; OSError
        (ENOENT) names why when there is none."""
        sock = os.environ.get(AGENT_SOCKET_ENV)
        if not sock:
            raise OSError(errno.ENOENT, f"{AGENT_SOCKET_ENV} is not set: this app runs on no miner's node")
        try:
            read = VolumeRead(job_id=self.job_id, name=name, t_ns=self.clock())
        except ValueError:
            raise OSError(errno.ENOENT, f"{name[:80]!r} is not a file name of a job's volume") from None
        read.job_sig = self.key.sign(read.signed_bytes())
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=timeout_s) as agent:
                resp = agent.post(f"http://agent{VOLUME_READ_PATH}", json=read.model_dump())
        except httpx.HTTPError as exc:
            raise OSError(errno.EIO, f"the miner's agent at {sock}: {exc!r}") from None
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {resp.status_code}"
            raise OSError(errno.ENOENT, message)
        return resp.content

    def check(self, headers, body: bytes, *, method: str, path: str) -> RequestEnvelope:
        """The job checks the envelope itself too: a call that skips the proxy is refused here."""
        return check_request(headers, body, method=method, path=path, job_id=self.job_id,
                             client_keys=self.client_keys, nonces=self.nonces, max_skew_s=self.max_skew_s,
                             clock=self.clock)

    def sign(self, env: RequestEnvelope, *, t_from: int, output: bytes) -> str:
        """The job's half of the receipt, base64, for the header or the SSE trailer."""
        body = self.chain.next(job_id=self.job_id, request_id=env.request_id, t_from=t_from, t_to=self.clock(),
                               input_sha256=env.body_sha256, output_sha256=hashlib.sha256(output).hexdigest(),
                               job_key=self.key.public, miner_hotkey=self.miner_hotkey)
        half = {"body": body.model_dump(mode="json"), "job_sig": self.key.sign(body.canonical())}
        return base64.b64encode(canonical_bytes(half)).decode()


def parse_job_half(text: str | bytes) -> tuple[ReceiptBody, str]:
    half = json.loads(base64.b64decode(text, validate=True))
    return ReceiptBody.model_validate(half["body"]), str(half["job_sig"])
