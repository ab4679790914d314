"""Files rayhorde ships beside its code: the default configs and the example drivers.

An installed wheel carries them as package data (``cluster/_configs``, ``cluster/_examples``,
mapped from the checkout's ``configs/`` and ``examples/`` by
``pyproject.toml``); an editable install or a source checkout reads those two folders where
they are. Nothing else in rayhorde looks for files relative to the checkout.
"""

from __future__ import annotations

from pathlib import Path

from cluster.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent


def _folder(kind: str) -> Path:
    shipped = _PACKAGE / f"_{kind}"
    return shipped if shipped.is_dir() else _PACKAGE.parent / kind


def config_path(name: str) -> Path:
    """A default config shipped with rayhorde, e.g. ``config_path("validator.local.toml")``."""
    p = _folder("configs") / name
    if not p.is_file():
        raise ConfigError(f"rayhorde ships no config {name!r}; shipped: {sorted(f.name for f in _folder('configs').glob('*'))}")
    return p


def example_path(name: str) -> Path:
    """An example shipped with rayhorde, e.g. ``example_path("hello.py")`` (the demo's driver)."""
    p = _folder("examples") / name
    if not p.is_file():
        raise ConfigError(f"rayhorde ships no example {name!r}")
    return p


def package_root() -> Path:
    """The folder that holds the ``cluster``, ``jobs`` and ``serve_apps`` packages: what a Ray
    process started by rayhorde needs on its PYTHONPATH to import them by name."""
    return _PACKAGE.parent
