"""The one Serve application builder every whitelisted app is deployed through.

validator-core deploys streaming jobs with Serve's REST API (it drives the cluster over HTTP
and never unpickles anything a miner's node produced: ``ray.get`` would run the producer's
code in validator-core), so each application in the config is
``import_path: serve_apps.builder:build`` with JSON ``args``:

    {"app": "module:Class", "name": <deployment name>, "pin_resource": "miner:<hotkey>",
     "num_cpus": n, "memory_mb": m, "env": {...}, "max_ongoing_requests": n, "init": {kwargs}}

The replica is pinned to the miner's node by a small share of its ``miner:<hotkey>`` resource.
"""

from __future__ import annotations

import importlib
from typing import Any

from ray import serve


def build(args: dict[str, Any]):
    module, _, cls_name = args["app"].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    actor: dict[str, Any] = {"num_cpus": float(args.get("num_cpus", 0)),
                             "resources": {args["pin_resource"]: 0.01}}
    if args.get("memory_mb"):
        actor["memory"] = int(args["memory_mb"]) * 2**20
    if args.get("env"):
        actor["runtime_env"] = {"env_vars": dict(args["env"])}
    ongoing = int(args.get("max_ongoing_requests", 64))
    # a bounded queue: when the pinned node is gone, callers get 503 instead of waiting forever
    dep = serve.deployment(cls, name=args.get("name", cls_name), num_replicas=1, max_ongoing_requests=ongoing,
                           max_queued_requests=4 * ongoing, ray_actor_options=actor)
    return dep.bind(**args.get("init", {}))
