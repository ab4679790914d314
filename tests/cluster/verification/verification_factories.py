"""Verifier factories for the verification-cluster PLUMBING test (not a real verifier).

``echo_verifier`` builds an object with the verifier contract of
``cluster.verification.actors`` (``verify_batch(claims, margin) -> list[Verdict]`` and
``close()``) that checks nothing: every claim gets an ``ok`` verdict. It exercises actor
placement, autoscaling and the JSON boundary only; the real prefill verifier
(``cluster.verification.verifier``) is plugged in the same way, by its
"module:callable" name.
"""
from __future__ import annotations

import os

from cluster.verification.models import Claim, Verdict


class EchoVerifier:
    def __init__(self, tag: str = "echo") -> None:
        self.tag = tag
        self.closed = False
        self.pid = os.getpid()

    def verify_batch(self, claims: list[Claim], margin: float) -> list[Verdict]:
        if self.closed:
            raise RuntimeError("verifier is closed")
        return [Verdict(request_id=c.request_id, job_id=c.job_id, miner_hotkey=c.miner_hotkey, ok=True,
                        reason="ok", message=f"{self.tag} pid={self.pid}", margin=margin,
                        weights_sha256=c.weights_sha256) for c in claims]

    def close(self) -> None:
        self.closed = True


def echo_verifier(**kwargs) -> EchoVerifier:
    return EchoVerifier(**kwargs)
