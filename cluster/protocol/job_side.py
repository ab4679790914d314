"""What every whitelisted streaming app does for its job, whatever it serves: hold the job key
(generated inside the app, never leaving it), check each client envelope (the proxy checks it
too: a call that skips the proxy is refused here), and sign its half of each receipt (the miner
proxy counter-signs).

The job's half travels to the proxy as ``X-Rayhorde-Job-Receipt: base64({"body", "job_sig"})``
for buffered answers, or as a final SSE comment line ``: job-receipt <base64>``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from cluster.protocol.canonical import canonical_bytes
from cluster.protocol.client_envelope import MemoryNonces, RequestEnvelope, check_request
from cluster.protocol.keys import PublicKey, SigningKey
from cluster.protocol.receipts import ReceiptBody, ReceiptChain

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
        self.key = SigningKey()
        self.chain = ReceiptChain()
        self.nonces = MemoryNonces(keep_s=4 * max_skew_s + 60)

    def volume_file(self, name: str) -> Path:
        """A file the client sent into this job's volume through the miner proxy. The agent sets
        ``RAYHORDE_STREAM_VOLUMES`` on its Ray node; names are plain (no separators)."""
        root = os.environ.get("RAYHORDE_STREAM_VOLUMES")
        if not root or "/" in name or name.startswith("."):
            raise OSError(2, "no such file in the job's volume")
        return Path(root) / self.job_id / name

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
