"""Module paths that moved, so that a path stored or configured before the move still resolves.

Some values name Python code by path and outlive a release: the Serve application entry of each
streaming job (``import_path`` ``module:attr`` and its app ``module:Class``) is stored in the
validator's database, and settings name a verifier factory ``module:callable``. When a module
moves, its old path is listed here; :func:`current_module_path` rewrites an old path to the
module's current one and leaves every other path as it is (so applying it twice changes
nothing). The validator's database migrates its stored paths with it once; settings readers
may pass a configured path through it.

Two kinds of rows: a key ending in ``.`` is a package prefix (every module under it moved to the
same place under the new prefix); any other key is exactly one module.
"""

from __future__ import annotations

# old -> new, from the move to one folder per role and trust zone (`_private` folders dissolved)
MOVED_MODULES: dict[str, str] = {
    # Serve's application builder and the LLM engines shared by the app and the verifier
    "serve_apps._private.builder": "serve_apps.builder",
    "serve_apps._private.llm": "serve_apps.inference",
    "serve_apps._private.llm.": "serve_apps.inference.",
    # streaming wire formats, now in cluster.protocol
    "serve_apps._private.client_envelope": "cluster.protocol.client_envelope",
    "serve_apps._private.job_side": "cluster.protocol.job_side",
    "serve_apps._private.keys": "cluster.protocol.keys",
    "serve_apps._private.models": "cluster.protocol.streams",
    "serve_apps._private.receipts": "cluster.protocol.receipts",
    "serve_apps._private.whitelist": "cluster.protocol.whitelist",
    "jobs._private.models": "cluster.protocol.jobs",
    "jobs._private.io_models": "cluster.protocol.job_io",
    # the roles' packages
    "cluster._private.verification.": "cluster.verification.",
    "cluster._private.validator.": "cluster.validator.",
    "cluster._private.validator.service": "cluster.validator.core",
    "cluster.validator.service": "cluster.validator.core",  # split into desks; the core composes them
    "cluster._private.miner.": "cluster.miner.",
    "cluster._private.miner.images": "cluster.protocol.images",
    "cluster._private.chain": "cluster.chain",
    "cluster._private.chain.": "cluster.chain.",
    # single modules of the old cluster._private
    "cluster._private.canonical": "cluster.protocol.canonical",
    "cluster._private.envelope": "cluster.protocol.envelope",
    "cluster._private.http": "cluster.protocol.http",
    "cluster._private.identity": "cluster.protocol.identity",
    "cluster._private.protocol": "cluster.protocol.messages",
    "cluster._private.user": "cluster.protocol.user",
    "cluster._private.version": "cluster.protocol.version",
    "cluster._private.settings": "cluster.settings",
    "cluster._private.ray_node": "cluster.fabric.ray_node",
    "cluster._private.local_stack": "cluster.devstack.local_stack",
    "cluster._private.demo": "cluster.cli.demo",
    "cluster._private.stream_cli": "cluster.cli.streams",
}


def current_module_path(path: str) -> str:
    """``path`` (``module`` or ``module:attr``) with a moved module replaced by its current one."""
    module, colon, attr = path.partition(":")
    new = MOVED_MODULES.get(module)
    if new is None:
        prefixes = [old for old in MOVED_MODULES if old.endswith(".") and module.startswith(old)]
        if not prefixes:
            return path
        old = max(prefixes, key=len)  # the most specific package wins
        new = MOVED_MODULES[old] + module[len(old):]
    return new + colon + attr
