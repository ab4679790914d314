"""The house's rules, checked: import layers (import-linter contracts in pyproject.toml), module
size, the package list, and an install that works without the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("cluster", "jobs", "serve_apps")
LINT = Path(sys.executable).with_name("lint-imports")
MAX_LINES = 500


def _lint(root: Path) -> subprocess.CompletedProcess:
    # lint-imports puts the current directory first on sys.path: run in ``root``, it reads that tree
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_import_contracts_hold():
    out = _lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def _copy_tree(dest: Path, names: tuple[str, ...] = (*PRODUCT, "tests", "benchmarks")) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in names:
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")


@pytest.mark.parametrize("module, line, contract, offence", [
    ("cluster/protocol/canonical.py", "import cluster.validator.store", "cluster: errors < resources < protocol",
     "cluster.protocol is not allowed to import cluster.validator"),
    ("cluster/miner/agent.py", "from cluster.devstack import local_stack", "cluster: errors < resources < protocol",
     "cluster.miner is not allowed to import cluster.devstack"),
    ("jobs/api.py", "from cluster.validator import store", "jobs and serve_apps use only",
     "jobs is not allowed to import cluster.validator"),
    ("cluster/settings.py", "import tests.conftest", "the product never imports the tests",
     "cluster is not allowed to import tests"),
])
def test_an_upward_import_breaks_the_contracts(tmp_path, module, line, contract, offence):
    """The contracts are not vacuous: one import against the layers in a copy of the tree fails the lint."""
    _copy_tree(tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # deliberately against the layers\n")
    out = _lint(tmp_path)
    assert out.returncode != 0, out.stdout
    assert contract in out.stdout and offence in out.stdout, out.stdout


def test_no_import_circles():
    """No two product modules import each other, directly or round a loop, also not through an
    import inside a function (grimp reads those too)."""
    import grimp

    graph = grimp.build_graph(*PRODUCT)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(m: str) -> None:  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in graph.find_modules_directly_imported_by(m) - {m}:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            part = []
            while (n := stack.pop()) != m:
                part.append(n)
            if part:
                circles.append(sorted([m, *part]))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert circles == []


def test_no_product_module_is_over_the_limit():
    long = {str(p.relative_to(REPO)): n for pkg in PRODUCT for p in (REPO / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules (limit {MAX_LINES} lines): {long}"


def test_package_list_matches_the_tree():
    """pyproject lists packages explicitly (configs and examples are mapped in as package data):
    a package folder missing from the list would be missing from every wheel."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(REPO)).replace("/", ".") for pkg in PRODUCT
             for p in (REPO / pkg).rglob("__init__.py")}
    assert found == listed - {"cluster._configs", "cluster._examples"}


@pytest.mark.integration
@pytest.mark.slow
def test_wheel_install_works_outside_the_checkout(tmp_path):
    """A non-editable install: the CLI, the three packages and the shipped configs all load from
    the installed files, in a directory that is not the checkout.

    The fresh venv gets this venv's site-packages as a plain path (so the dependencies, ~4 GB with
    vLLM, are not installed again) but not its .pth files: the editable install that points at the
    checkout stays out of it."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    Path(site, "deps.pth").write_text(ours + "\n")
    source = tmp_path / "source"  # setuptools builds in the source tree: build in a copy, leave the checkout clean
    _copy_tree(source, names=(*PRODUCT, "configs", "examples"))
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheel_dir), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("rayhorde-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}:{env['PATH']}"

    def run(*argv: str) -> str:
        out = subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    assert "Usage: rayhorde" in run(str(env_dir / "bin" / "rayhorde"), "--help")
    probe = r"""
import json, cluster, jobs, serve_apps
from cluster.chain import LocalChain
from cluster.protocol.whitelist import Whitelist
from cluster.resources import config_path
from cluster.settings import MinerSettings, ValidatorSettings, load_executor_classes, load_settings
v = load_settings(ValidatorSettings, config_path("validator.local.toml"), env_prefix="X_NONE_")
m = load_settings(MinerSettings, config_path("miner.local.toml"), env_prefix="X_NONE_")
print(json.dumps({
    "modules": [cluster.__file__, jobs.__file__, serve_apps.__file__],
    "paths": [str(p) for p in (v.executor_classes_path, v.metagraph_path, v.whitelist_path, m.executor_classes_path,
                               config_path("verification.yaml"))],
    "classes": sorted(load_executor_classes(v.executor_classes_path)),
    "neurons": len(LocalChain(v.metagraph_path).metagraph(v.netuid).neurons),
    "apps": [a.name for a in Whitelist.load(v.whitelist_path).apps],
}))
"""
    import json
    got = json.loads(run(str(py), "-c", probe))
    installed = str(Path(site).resolve())
    for path in got["modules"] + got["paths"]:
        assert str(Path(path).resolve()).startswith(installed), f"{path} is not from the installed wheel"
    assert "always_on.test" in got["classes"] and got["neurons"] >= 3 and "echo" in got["apps"]
