"""Verification actors on the private verification cluster (see ``cluster.py``).

A :class:`VerifierActor` requests ``{"gpu80gb": 1}`` (and one CPU), a resource only the
autoscaled ``gpu80`` workers advertise, so creating one makes the autoscaler add such a worker.
It builds its verifier from a factory given by name, ``"module:callable"`` (vLLM forces
``spawn``, so everything must be importable by name anyway), called with JSON keyword
arguments. The verifier contract::

    verifier = factory(**factory_kwargs)
    verifier.verify_batch(claims: list[Claim], margin: float) -> list[Verdict]   # same order
    verifier.close()   # optional; vLLM engines must be shut down before their actor dies

:func:`run_batch` is the driver side: create the actor, wait for it (scale-up), run one batch,
``close()`` the verifier, kill the actor so its node goes idle and the autoscaler removes it.
Only JSON (pydantic ``model_dump(mode="json")``) crosses the actor boundary.

Command line (what ``VerificationClient`` runs, in a separate process)::

    python -m cluster._private.verification.actors run-batch --address 127.0.0.1:<gcs> \
        --claims claims.json --out verdicts.json --margin 0.5 --factory module:callable
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import ray

from cluster._private.verification.models import Claim, Verdict

CUSTOM_RESOURCE = "gpu80gb"
NAMESPACE = "rayhorde-verification"
log = logging.getLogger(__name__)


def load_factory(path: str) -> Callable[..., Any]:
    """Resolve ``"package.module:callable"`` (attribute paths with dots allowed after ``:``)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory must be 'module:callable', got {path!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path} is not callable")
    return obj


@ray.remote(num_cpus=1, resources={CUSTOM_RESOURCE: 1}, max_restarts=0, max_task_retries=0)
class VerifierActor:
    """One verifier on one ``gpu80`` worker. Verdicts name it: ``"<actor id>@<node id>"``."""

    def __init__(self, factory: str, factory_kwargs: dict[str, Any] | None = None) -> None:
        self.init_started = time.time()
        ctx = ray.get_runtime_context()
        self.actor_id = ctx.get_actor_id()
        self.node_id = ctx.get_node_id()
        self.name = f"{self.actor_id}@{self.node_id}"
        self._verifier = load_factory(factory)(**(factory_kwargs or {}))
        self.init_done = time.time()

    def ready(self) -> dict[str, Any]:
        return {"actor_id": self.actor_id, "node_id": self.node_id, "name": self.name, "pid": os.getpid(),
                "init_started": self.init_started, "init_done": self.init_done}

    def verify(self, claims_json: list[dict[str, Any]], margin: float) -> list[dict[str, Any]]:
        claims = [Claim.model_validate(c) for c in claims_json]
        verdicts = self._verifier.verify_batch(claims, margin)
        if len(verdicts) != len(claims):
            raise RuntimeError(f"verifier returned {len(verdicts)} verdicts for {len(claims)} claims")
        out = []
        for v in verdicts:
            v = v if isinstance(v, Verdict) else Verdict.model_validate(v)
            out.append(v.model_copy(update={"verifier": self.name}).model_dump(mode="json"))
        return out

    def close(self) -> None:
        close = getattr(self._verifier, "close", None)
        if close is not None:
            close()
        self._verifier = None


def run_batch(address: str, claims: list[Claim] | list[dict[str, Any]], margin: float, factory: str,
              factory_kwargs: dict[str, Any] | None = None, *, scale_up_timeout_s: float = 300,
              verify_timeout_s: float = 600, close_timeout_s: float = 60, num_gpus: float = 0) -> dict[str, Any]:
    """Driver side: one actor, one batch, then close + kill (the worker then idles out).

    Connects to ``address`` unless this process is already a driver (of that cluster: the
    caller's responsibility). Returns ``{"verdicts": [verdict dicts], "actor": {...},
    "timings": {...}}``; wall-clock times are comparable with the actor's (same host locally).
    ``num_gpus``: 0 with fake nodes; 1 on real 80 GB GPU workers (sets CUDA_VISIBLE_DEVICES).
    """
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    # Validate on the driver side too: a malformed claim fails here, not on a fresh GPU worker.
    claims_json = [(c if isinstance(c, Claim) else Claim.model_validate(c)).model_dump(mode="json") for c in claims]
    timings: dict[str, float] = {}
    t_submit = time.time()
    actor = VerifierActor.options(num_gpus=num_gpus).remote(factory, factory_kwargs or {})
    try:
        info = ray.get(actor.ready.remote(), timeout=scale_up_timeout_s)
        t_ready = time.time()
        # From the request to the actor's constructor starting: the autoscaler adding a worker,
        # the node registering, a worker process starting.
        timings["scale_up_s"] = info["init_started"] - t_submit
        timings["verifier_init_s"] = info["init_done"] - info["init_started"]
        timings["actor_ready_s"] = t_ready - t_submit
        verdicts = ray.get(actor.verify.remote(claims_json, margin), timeout=verify_timeout_s)
        timings["verify_s"] = time.time() - t_ready
        try:
            ray.get(actor.close.remote(), timeout=close_timeout_s)
        except Exception:  # noqa: BLE001 - the actor is killed below anyway
            log.exception("verifier close() failed")
    finally:
        ray.kill(actor, no_restart=True)
        timings["killed_at"] = time.time()
    return {"verdicts": verdicts, "actor": info, "timings": timings}


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster._private.verification.actors")
    sub = p.add_subparsers(dest="cmd", required=True)
    rb = sub.add_parser("run-batch", help="run one batch of claims through a fresh VerifierActor")
    rb.add_argument("--address", required=True, help="GCS address of the verification cluster")
    rb.add_argument("--claims", required=True, help="JSON file: a list of Claim dicts")
    rb.add_argument("--out", required=True, help="JSON file to write the result to")
    rb.add_argument("--margin", type=float, required=True)
    rb.add_argument("--factory", required=True, help="module:callable building the verifier")
    rb.add_argument("--factory-kwargs", default="{}", help="JSON object passed to the factory")
    rb.add_argument("--scale-up-timeout-s", type=float, default=300)
    rb.add_argument("--verify-timeout-s", type=float, default=600)
    rb.add_argument("--num-gpus", type=float, default=0)
    a = p.parse_args(argv)
    with open(a.claims) as f:
        claims = [Claim.model_validate(c) for c in json.load(f)]
    try:
        result = run_batch(a.address, claims, a.margin, a.factory, json.loads(a.factory_kwargs),
                           scale_up_timeout_s=a.scale_up_timeout_s, verify_timeout_s=a.verify_timeout_s,
                           num_gpus=a.num_gpus)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    tmp = f"{a.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Run the importable module, not this ``__main__`` copy: Ray then ships VerifierActor to the
    # workers by reference (module + name), not as a pickled-by-value class.
    from cluster._private.verification import actors as _actors

    sys.exit(_actors._main(sys.argv[1:]))
