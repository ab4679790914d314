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
With ``keep_warm_s`` > 0 the actor is instead a detached, named one (one name per verifier
configuration) that the next batch finds and reuses (no second model load: ~15-20 s of vLLM on
CPU, minutes on a GPU) and that closes its verifier and exits by itself once no batch came for
``keep_warm_s``; then its node idles out as before. A batch that meets an actor in the middle of
exiting gets a fresh one. Only JSON (pydantic ``model_dump(mode="json")``) crosses the actor
boundary.

Command line (what ``VerificationClient`` runs, in a separate process)::

    python -m cluster.verification.actors run-batch --address 127.0.0.1:<gcs> \
        --claims claims.json --out verdicts.json --margin 0.5 --factory module:callable
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable

import ray

from cluster.errors import VerifierExiting
from cluster.verification.cluster import CUSTOM_RESOURCE
from cluster.verification.models import Claim, Verdict

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

    def __init__(self, factory: str, factory_kwargs: dict[str, Any] | None = None, keep_warm_s: float = 0) -> None:
        self.init_started = time.time()
        ctx = ray.get_runtime_context()
        self.actor_id = ctx.get_actor_id()
        self.node_id = ctx.get_node_id()
        self.name = f"{self.actor_id}@{self.node_id}"
        self._verifier = load_factory(factory)(**(factory_kwargs or {}))
        self.init_done = time.time()
        self.batches = 0
        self._lock = threading.Lock()  # a batch and the idle exit never overlap
        self._last = time.monotonic()
        if keep_warm_s > 0:
            threading.Thread(target=self._exit_when_idle, args=(keep_warm_s,), daemon=True).start()

    def _exit_when_idle(self, keep_warm_s: float) -> None:
        while True:
            time.sleep(min(1.0, keep_warm_s / 4))
            with self._lock:
                if self._verifier is not None and time.monotonic() - self._last >= keep_warm_s:
                    self.close()  # vLLM shuts down before the process goes
                    break
        log.info("verifier %s idle for %.0f s after %d batches: exiting", self.name, keep_warm_s, self.batches)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def ready(self) -> dict[str, Any]:
        return {"actor_id": self.actor_id, "node_id": self.node_id, "name": self.name, "pid": os.getpid(),
                "init_started": self.init_started, "init_done": self.init_done, "batches": self.batches}

    def verify(self, claims_json: list[dict[str, Any]], margin: float) -> list[dict[str, Any]]:
        with self._lock:
            if self._verifier is None:
                raise VerifierExiting(f"verifier {self.name} closed after {self.batches} batches (idle)")
            self.batches += 1
            try:
                return self._verify(claims_json, margin)
            finally:
                self._last = time.monotonic()

    def _verify(self, claims_json: list[dict[str, Any]], margin: float) -> list[dict[str, Any]]:
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


def warm_name(factory: str, factory_kwargs: dict[str, Any] | None) -> str:
    """One warm actor per verifier configuration (another model or dtype gets its own)."""
    key = json.dumps([factory, factory_kwargs or {}], sort_keys=True).encode()
    return "verifier-" + hashlib.sha256(key).hexdigest()[:16]


def run_batch(address: str, claims: list[Claim] | list[dict[str, Any]], margin: float, factory: str,
              factory_kwargs: dict[str, Any] | None = None, *, scale_up_timeout_s: float = 300,
              verify_timeout_s: float = 600, close_timeout_s: float = 60, num_gpus: float = 0,
              keep_warm_s: float = 0) -> dict[str, Any]:
    """Driver side: one batch on a verifier actor. ``keep_warm_s`` 0: a fresh actor, closed and
    killed after the batch (the worker then idles out); > 0: the warm actor of this configuration,
    created if there is none, left running (it exits after ``keep_warm_s`` without a batch).

    Connects to ``address`` unless this process is already a driver (of that cluster: the
    caller's responsibility). Returns ``{"verdicts": [verdict dicts], "actor": {...},
    "timings": {...}}``; wall-clock times are comparable with the actor's (same host locally).
    ``num_gpus``: 0 with fake nodes; 1 on real 80 GB GPU workers (sets CUDA_VISIBLE_DEVICES).
    """
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    # Validate on the driver side too: a malformed claim fails here, not on a fresh GPU worker.
    claims_json = [(c if isinstance(c, Claim) else Claim.model_validate(c)).model_dump(mode="json") for c in claims]
    for attempt in (1, 2):
        try:
            return _one_batch(claims_json, margin, factory, factory_kwargs, scale_up_timeout_s=scale_up_timeout_s,
                              verify_timeout_s=verify_timeout_s, close_timeout_s=close_timeout_s,
                              num_gpus=num_gpus, keep_warm_s=keep_warm_s)
        except (VerifierExiting, ray.exceptions.RayActorError) as exc:
            # a warm actor that was exiting (idle) as this batch reached it: once more, on a fresh one
            if keep_warm_s <= 0 or attempt == 2:
                raise
            log.info("warm verifier gone (%s); starting a fresh one", exc)
            time.sleep(1)  # its name is released once it is dead
    raise AssertionError("unreachable")


def _one_batch(claims_json: list[dict[str, Any]], margin: float, factory: str, factory_kwargs: dict[str, Any] | None,
               *, scale_up_timeout_s: float, verify_timeout_s: float, close_timeout_s: float, num_gpus: float,
               keep_warm_s: float) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t_submit = time.time()
    options: dict[str, Any] = {"num_gpus": num_gpus}
    if keep_warm_s > 0:
        options.update(name=warm_name(factory, factory_kwargs), namespace=NAMESPACE, lifetime="detached",
                       get_if_exists=True)
    actor = VerifierActor.options(**options).remote(factory, factory_kwargs or {}, keep_warm_s)
    info = None
    try:
        info = ray.get(actor.ready.remote(), timeout=scale_up_timeout_s)
        t_ready = time.time()
        # From the request to the actor's constructor starting: the autoscaler adding a worker,
        # the node registering, a worker process starting (0 for a warm actor that was already up).
        timings["scale_up_s"] = max(0.0, info["init_started"] - t_submit)
        timings["verifier_init_s"] = info["init_done"] - info["init_started"] if info["batches"] == 0 else 0.0
        timings["actor_ready_s"] = t_ready - t_submit
        verdicts = ray.get(actor.verify.remote(claims_json, margin), timeout=verify_timeout_s)
        timings["verify_s"] = time.time() - t_ready
        if keep_warm_s <= 0:
            try:
                ray.get(actor.close.remote(), timeout=close_timeout_s)
            except Exception:  # noqa: BLE001 - the actor is killed below anyway
                log.exception("verifier close() failed")
    except ray.exceptions.RayTaskError as exc:  # the actor's own exception, wrapped
        if isinstance(exc.cause, VerifierExiting):
            raise exc.cause from exc
        raise
    finally:
        if keep_warm_s <= 0:
            ray.kill(actor, no_restart=True)
            timings["killed_at"] = time.time()
    return {"verdicts": verdicts, "actor": {**info, "warm": keep_warm_s > 0}, "timings": timings}


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.verification.actors")
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
    rb.add_argument("--keep-warm-s", type=float, default=0, help="reuse / leave a warm actor (0: one per batch)")
    a = p.parse_args(argv)
    with open(a.claims) as f:
        claims = [Claim.model_validate(c) for c in json.load(f)]
    try:
        result = run_batch(a.address, claims, a.margin, a.factory, json.loads(a.factory_kwargs),
                           scale_up_timeout_s=a.scale_up_timeout_s, verify_timeout_s=a.verify_timeout_s,
                           num_gpus=a.num_gpus, keep_warm_s=a.keep_warm_s)
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
    from cluster.verification import actors as _actors

    sys.exit(_actors._main(sys.argv[1:]))
