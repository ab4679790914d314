"""The public surfaces are small and exact (new public names are a deliberate change), and the
error tree drawn in cluster/errors.py is the one defined there."""

import re

import cluster
import cluster.errors
import jobs
import serve_apps


def test_jobs_public_names():
    assert sorted(jobs.__all__) == ["Failure", "FailureKind", "JobHandle", "JobNotFinished", "JobResult", "JobSpec",
                                    "JobStatus", "JobView", "StatusEvent", "follow", "submit"]
    assert all(hasattr(jobs, name) for name in jobs.__all__)


def test_cluster_public_names():
    assert sorted(cluster.__all__) == sorted([
        "ExecutorClass", "Hotkey", "LocalChain", "LocalStack", "MinerSettings", "SignedEnvelope", "ValidatorSettings",
        "errors", "load_settings", "load_wallet", "open_envelope", "request_capability", "seal",
    ])
    assert all(hasattr(cluster, name) for name in cluster.__all__)


def test_serve_apps_public_names():
    assert sorted(serve_apps.__all__) == sorted([
        "RECEIPT_HEADER", "REQUEST_HEADER", "SIGNATURE_HEADER", "PublicKey", "Receipt", "ReceiptBody", "ReceiptChain",
        "ReceiptInvalid", "RequestEnvelope", "RequestRefused", "RequestSigner", "SigningKey", "check_request",
        "job_sign", "miner_countersign", "sign_request", "split_sse", "verify_receipt",
        "AppRefused", "Whitelist", "WhitelistEntry", "weights_digest",
        "Answer", "StreamFailed", "StreamJob", "StreamReady", "StreamSpec", "StreamView", "Streams",
        "VerifyingTransport",
    ])
    assert all(hasattr(serve_apps, name) for name in serve_apps.__all__)


def _drawn_tree() -> dict[str, str]:
    """{class name: parent name} as drawn in cluster/errors.py's docstring."""
    parents: dict[str, str] = {}
    stack: list[str] = []
    for line in cluster.errors.__doc__.splitlines():
        m = re.match(r"^    ((?:[│ ]   )*)[├└]── (\w+)", line)
        if line.strip() == "RayhordeError":
            stack = ["RayhordeError"]
        elif m:
            depth = len(m.group(1)) // 4 + 1
            del stack[depth:]
            parents[m.group(2)] = stack[-1]
            stack.append(m.group(2))
    return parents


def test_the_error_tree_drawn_is_the_tree_defined():
    """Every class in cluster.errors is drawn in its docstring, under its real parent."""
    defined = {name: cls for name, cls in vars(cluster.errors).items()
               if isinstance(cls, type) and issubclass(cls, cluster.errors.RayhordeError)
               and cls.__module__ == "cluster.errors"}
    real = {name: next(b.__name__ for b in cls.__bases__ if issubclass(b, cluster.errors.RayhordeError))
            for name, cls in defined.items() if cls is not cluster.errors.RayhordeError}
    assert _drawn_tree() == real


def test_public_exceptions_live_in_the_error_tree():
    """An exception a client can catch by a public name is one of cluster.errors' classes."""
    for surface in (jobs, serve_apps):
        for name in surface.__all__:
            obj = getattr(surface, name)
            if isinstance(obj, type) and issubclass(obj, BaseException):
                assert obj.__module__ == "cluster.errors" and issubclass(obj, cluster.errors.RayhordeError), name


def test_no_exception_class_is_defined_outside_the_error_tree():
    """Every exception rayhorde defines lives in cluster/errors.py (read from the source: importing
    every module would load the model stack)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tree_names = {n for n, c in vars(cluster.errors).items() if isinstance(c, type) and issubclass(c, BaseException)}
    outside = []
    for pkg in ("cluster", "jobs", "serve_apps"):
        for path in (root / pkg).rglob("*.py"):
            if path == root / "cluster" / "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                    if any(b.endswith(("Error", "Exception")) or b in tree_names for b in bases):
                        outside.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    assert outside == []
