"""Images: pulls by digest from a real local registry (Debian's docker-registry, started by
scripts/registry.sh, one instance without and one with basic auth), the pull limit, registry
errors mapped to reasons, the validator's allow/deny policy, and the GPU toolkit refusal (this
machine has no GPU and no toolkit).

What dockerd actually does, and so what these tests pin down:
- a well-formed digest the registry does not have is "manifest unknown": ``image_pull_failed``;
- a tag written beside a digest (``repo:tag@sha256:...``) is ignored: dockerd pulls by digest;
- ``image_digest_mismatch`` is a registry (or something in between) serving bytes that do not
  hash to the requested digest: dockerd refuses them ("manifest verification failed"), shown here
  with a proxy that alters manifests.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import docker
import docker.errors
import pytest

from cluster.errors import GpuUnsupported, ImageDenied, ImagePullFailed, InvalidImageReference
from cluster.miner.docker_runtime import PULL_THREAD_PREFIX, DockerRuntime
from cluster.miner.gpu import ToolkitVersion, check_gpu_support, nvidia_toolkit_version, parse_toolkit_version
from cluster.miner.runtime import ContainerRun, RuntimeFeature
from cluster.protocol.images import ImagePolicy, digest_matches, parse_reference
from tests.conftest import DOCKER_HOST, IMAGE, REPO

pytestmark = pytest.mark.integration

REGISTRY_SH = REPO / "scripts" / "registry.sh"
LABEL = "rayhorde.test_images"


def sh(*args: str) -> str:
    return subprocess.run([str(REGISTRY_SH), *args], check=True, capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def registries(engine):
    """Both local registries; stopped at the end only if this module started them."""
    started = []
    for name in ("plain", "auth"):
        if subprocess.run([str(REGISTRY_SH), "running", name]).returncode != 0:
            sh("start", name)
            started.append(name)
    try:
        yield {"plain": sh("url", "plain"), "auth": sh("url", "auth"), "creds": json.loads(sh("credentials", "auth"))}
    finally:
        for name in started:
            sh("stop", name)


@pytest.fixture(scope="module")
def runtime(engine) -> DockerRuntime:
    return DockerRuntime(DOCKER_HOST)


class Pushed:
    def __init__(self, token: str, image_id: str, repo: dict[str, str], digest: dict[str, str]) -> None:
        self.token, self.image_id, self.repo, self.digest = token, image_id, repo, digest

    def ref(self, which: str = "plain") -> str:
        return f"{self.repo[which]}@{self.digest[which]}"


def push_fresh(engine: docker.DockerClient, registries, which: tuple[str, ...] = ("plain", "auth")) -> Pushed:
    """A fresh image (rayhorde/busybox:local + a /marker layer unique to this call) pushed under tag
    ``v1``, then removed locally, so every pull really downloads a layer and its manifest."""
    token = uuid.uuid4().hex[:12]
    box = engine.containers.run(IMAGE, ["sh", "-c", f"echo {token} > /marker"], detach=True, labels={LABEL: "1"})
    box.wait(timeout=30)
    image = box.commit()
    box.remove(force=True)
    repo, digest = {}, {}
    for name in which:
        repo[name] = f"{registries[name]}/rayhorde-test/img-{token}"
        image.tag(repo[name], "v1")
        auth = registries["creds"] if name == "auth" else None
        out = list(engine.api.push(repo[name], tag="v1", stream=True, decode=True, auth_config=auth))
        aux = [m["aux"] for m in out if "aux" in m]
        assert aux, f"push to the {name} registry failed: {out[-1]}"
        digest[name] = aux[0]["Digest"]
    engine.images.remove(image.id, force=True)
    return Pushed(token, image.id, repo, digest)


@pytest.fixture(scope="module")
def pushed(engine: docker.DockerClient, registries):
    p = push_fresh(engine, registries)
    try:
        yield p
    finally:
        forget(engine, p)


def forget(engine: docker.DockerClient, pushed: Pushed) -> None:
    try:
        engine.images.remove(pushed.image_id, force=True)
    except docker.errors.ImageNotFound:
        pass


def present(engine: docker.DockerClient, ref: str) -> bool:
    try:
        engine.images.get(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def a_run(tmp_path: Path, image: str, command: list[str], **kw) -> ContainerRun:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir(exist_ok=True)
    artifacts.chmod(0o777)
    return ContainerRun(image=image, command=command, memory_mb=64, cpus_milli=500, pids=64, timeout_s=20,
                        artifacts_host_dir=artifacts, log_max_bytes=4096, labels={LABEL: "1"}, **kw)


class RegistryProxy:
    """An HTTP proxy on 127.0.0.1 in front of a registry: delays every response by ``delay_s``
    and, with ``tamper``, appends a byte to manifests fetched by digest (so they no longer hash
    to it). One connection per request (HTTP/1.0), which dockerd's client handles."""

    def __init__(self, upstream: str, *, delay_s: float = 0, tamper: bool = False) -> None:
        host, port = upstream.rsplit(":", 1)
        proxy = self
        self.requests: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                proxy.requests.append(f"{self.command} {self.path}")
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "host")}
                conn.request(self.command, self.path, headers=headers)
                up = conn.getresponse()
                body = up.read()
                conn.close()
                if tamper and self.command == "GET" and "/manifests/sha256:" in self.path and up.status == 200:
                    body += b"\n"
                time.sleep(delay_s)
                try:
                    self.send_response(up.status)
                    for k, v in up.getheaders():
                        if k.lower() not in ("connection", "transfer-encoding", "content-length", "keep-alive"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body) if self.command != "HEAD"
                                                           else up.getheader("Content-Length", "0")))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                except OSError:
                    pass  # the engine gave up on us

            do_GET = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RegistryProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------ pulls
def test_a_digest_pulled_from_the_registry_runs(runtime, engine, pushed, tmp_path):
    forget(engine, pushed)
    ref = pushed.ref("plain")
    t0 = time.monotonic()
    image_id = runtime.pull(ref, timeout_s=30)
    assert image_id == pushed.image_id  # the image config is content-addressed: the very image pushed
    assert digest_matches(engine.images.get(ref).attrs["RepoDigests"], pushed.repo["plain"], pushed.digest["plain"])
    out = runtime.run(a_run(tmp_path, ref, ["cat", "/marker"]))
    assert (out.exit_code, out.stdout.strip()) == (0, pushed.token)
    # present now: a second pull is answered by the engine alone (a stopped registry would not matter)
    t1 = time.monotonic()
    assert runtime.pull(ref, timeout_s=30) == image_id
    assert time.monotonic() - t1 < 0.5 and time.monotonic() - t0 < 20


def test_a_present_tag_is_not_pulled_and_an_absent_tag_is(runtime, engine, pushed):
    # rayhorde/busybox:local exists only locally: no registry is asked
    assert runtime.pull(IMAGE, timeout_s=5) == engine.images.get(IMAGE).id
    forget(engine, pushed)
    assert runtime.pull(f"{pushed.repo['plain']}:v1", timeout_s=30) == pushed.image_id


def test_a_wrong_digest_is_a_pull_failure_naming_the_digest(runtime, engine, pushed):
    wrong = "sha256:" + ("0" if pushed.digest["plain"][7] != "0" else "1") * 64
    with pytest.raises(ImagePullFailed) as err:
        runtime.pull(f"{pushed.repo['plain']}@{wrong}", timeout_s=30)
    assert err.value.reason == "image_pull_failed"
    assert err.value.stage == "image_pull"
    assert f"has no digest {wrong}" in err.value.message and "manifest unknown" in err.value.message
    assert not present(engine, f"{pushed.repo['plain']}@{wrong}")


def test_a_tag_beside_a_digest_is_ignored_by_the_engine(runtime, engine, pushed):
    forget(engine, pushed)
    ref = f"{pushed.repo['plain']}:no-such-tag@{pushed.digest['plain']}"
    assert parse_reference(ref).tag == "no-such-tag"
    assert runtime.pull(ref, timeout_s=30) == pushed.image_id


def test_content_not_matching_the_digest_is_a_digest_mismatch(runtime, engine, registries):
    # a digest this engine has never fetched: dockerd caches manifests by digest and would not ask again
    pushed = push_fresh(engine, registries, ("plain",))
    with RegistryProxy(registries["plain"], tamper=True) as evil:
        ref = f"{evil.url}/rayhorde-test/img-{pushed.token}@{pushed.digest['plain']}"
        with pytest.raises(ImagePullFailed) as err:
            runtime.pull(ref, timeout_s=30)
    assert err.value.reason == "image_digest_mismatch", err.value.message
    assert pushed.digest["plain"] in err.value.message and "altered" in err.value.message
    assert not present(engine, ref)
    assert any("/manifests/sha256:" in r and r.startswith("GET") for r in evil.requests)
    forget(engine, pushed)


def test_a_pull_past_its_limit_times_out_and_leaves_nothing_waiting(runtime, engine, pushed, registries):
    # every registry answer takes 1.5 s: the whole pull takes ~4.6 s (GET /v2/, the manifest, the
    # layers in parallel), against a 1 s limit
    forget(engine, pushed)
    with RegistryProxy(registries["plain"], delay_s=1.5) as slow:
        ref = f"{slow.url}/rayhorde-test/img-{pushed.token}@{pushed.digest['plain']}"
        t0 = time.monotonic()
        with pytest.raises(ImagePullFailed) as err:
            runtime.pull(ref, timeout_s=1)
        took = time.monotonic() - t0
        assert err.value.reason == "image_pull_timed_out" and err.value.stage == "image_pull"
        assert "1 s limit" in err.value.message and slow.url in err.value.message
        assert took < 1.5, f"the caller waited {took:.2f} s past a 1 s limit"
        deadline = time.monotonic() + 5
        while any(t.name.startswith(PULL_THREAD_PREFIX) for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [t.name for t in threading.enumerate() if t.name.startswith(PULL_THREAD_PREFIX)]
        # well past when the pull would have finished: dockerd dropped it with our connection
        time.sleep(max(0.0, 6.5 - (time.monotonic() - t0)))
        assert not present(engine, ref)


def test_the_auth_registry_needs_credentials(runtime, engine, pushed, registries):
    forget(engine, pushed)
    ref = pushed.ref("auth")
    with pytest.raises(ImagePullFailed) as err:
        runtime.pull(ref, timeout_s=30)
    assert err.value.reason == "image_pull_failed"
    assert "unauthorized" in err.value.message and "credentials" in err.value.message
    with pytest.raises(ImagePullFailed) as err:
        runtime.pull(ref, timeout_s=30, auth={**registries["creds"], "password": "wrong"})
    assert err.value.reason == "image_pull_failed" and "unauthorized" in err.value.message
    assert runtime.pull(ref, timeout_s=30, auth=registries["creds"]) == pushed.image_id


def test_an_unreachable_registry_is_a_pull_failure(runtime):
    with pytest.raises(ImagePullFailed) as err:
        runtime.pull("127.0.0.1:9/rayhorde-test/none@sha256:" + "a" * 64, timeout_s=10)
    assert err.value.reason == "image_pull_failed"
    assert "could not reach registry 127.0.0.1:9" in err.value.message and "connection refused" in err.value.message


def test_a_malformed_reference_is_refused_before_the_engine(runtime):
    with pytest.raises(ImagePullFailed) as err:
        runtime.pull("127.0.0.1:55000/x@sha256:abc", timeout_s=5)
    assert err.value.reason == "image_pull_failed" and "64 lower-case hex" in err.value.message


# --------------------------------------------------------------------------------- references
@pytest.mark.parametrize("image, expected", [
    ("busybox", ("busybox", None, None)),
    ("busybox:1.36", ("busybox", "1.36", None)),
    ("127.0.0.1:55000/rh/busybox:v1", ("127.0.0.1:55000/rh/busybox", "v1", None)),
    ("localhost/a/b@sha256:" + "f" * 64, ("localhost/a/b", None, "sha256:" + "f" * 64)),
    ("ghcr.io/o/r:t@sha256:" + "0" * 64, ("ghcr.io/o/r", "t", "sha256:" + "0" * 64)),
])
def test_parse_reference(image, expected):
    assert tuple(parse_reference(image)) == expected


@pytest.mark.parametrize("image", ["", "Busybox", "a b", "x@sha256:abc", "x@md5:" + "0" * 64, "x:", "x:-t",
                                   "/x", "x//y", "x@sha256:" + "A" * 64, "a" * 256])
def test_parse_reference_refuses(image):
    with pytest.raises(InvalidImageReference):
        parse_reference(image)


H = "sha256:" + "c" * 64


@pytest.mark.parametrize("repo_digests, repository, ok", [
    ([f"127.0.0.1:55000/rh/x@{H}"], "127.0.0.1:55000/rh/x", True),
    ([f"127.0.0.1:55001/rh/x@{H}"], "127.0.0.1:55000/rh/x", False),  # same digest, other registry
    ([f"127.0.0.1:55000/rh/x@sha256:{'d' * 64}"], "127.0.0.1:55000/rh/x", False),
    ([f"busybox@{H}"], "docker.io/library/busybox", True),  # familiar vs fully qualified
    ([], "busybox", False),
    (None, "busybox", False),
])
def test_digest_matches_repo_digests(repo_digests, repository, ok):
    assert digest_matches(repo_digests, repository, H) is ok


# ------------------------------------------------------------------------------------ policy
D = "@sha256:" + "e" * 64


@pytest.mark.parametrize("allow, deny, image, ok", [
    ([], [], "anything/at:all", True),
    ([], ["*:latest"], "busybox", False),  # an implicit latest is denied by a :latest rule
    ([], ["docker.io/*"], "busybox:1", False),  # the fully qualified form is matched too
    ([], ["busybox*"], "docker.io/library/busybox:1", False),  # and the familiar one
    (["127.0.0.1:55000/*"], [], "127.0.0.1:55000/rh/x" + D, True),
    (["127.0.0.1:55000/*"], [], "127.0.0.1:55001/rh/x" + D, False),
    (["127.0.0.1:55000/*"], [], "evil.example/127.0.0.1/x", False),
    (["127.0.0.1:55000/*"], ["127.0.0.1:55000/bad/*"], "127.0.0.1:55000/bad/x:1", False),  # deny wins
    (["*@sha256:*"], [], "ghcr.io/o/r:1", False),  # "digests only"
    (["*@sha256:*"], [], "ghcr.io/o/r" + D, True),
    (["rayhorde/*"], [], "rayhorde/busybox:local", True),
])
def test_image_policy_matrix(allow, deny, image, ok):
    policy = ImagePolicy(allow=allow, deny=deny)
    assert policy.allows(image) is ok
    if ok:
        policy.check(image)
    else:
        with pytest.raises(ImageDenied) as err:
            policy.check(image)
        assert err.value.reason == "image_denied" and err.value.status_code == 403
        rule = deny[0] if deny and "denied by" in err.value.message else None
        assert (f"rule {rule!r}" in err.value.message) if rule else "image_allow list" in err.value.message


def test_image_policy_refuses_malformed_references_and_empty_patterns():
    with pytest.raises(InvalidImageReference):
        ImagePolicy(allow=["*"]).check("a/B")
    with pytest.raises(ValueError):
        ImagePolicy(deny=[""])


# --------------------------------------------------------------------------------------- GPU
def test_a_gpu_run_is_refused_without_the_toolkit(runtime, engine, tmp_path):
    if nvidia_toolkit_version() is not None:
        pytest.skip("an NVIDIA container toolkit is installed here")
    assert RuntimeFeature.GPU not in runtime.features
    assert runtime.gpu_refusal is not None and runtime.gpu_refusal.reason == "gpu_toolkit_missing"
    before = len(engine.containers.list(all=True, filters={"label": LABEL}))
    with pytest.raises(GpuUnsupported) as err:
        runtime.run(a_run(tmp_path, IMAGE, ["true"], gpus=1))
    assert err.value.reason == "gpu_toolkit_missing"
    assert ">= 1.17.8" in err.value.message
    assert len(engine.containers.list(all=True, filters={"label": LABEL})) == before


@pytest.mark.parametrize("text, version, ok", [
    ("NVIDIA Container Toolkit CLI version 1.17.7\ncommit: abc", (1, 17, 7), False),
    ("NVIDIA Container Toolkit CLI version 1.17.8\ncommit: abc", (1, 17, 8), True),
    ("NVIDIA Container Runtime Hook version 1.18.0\ncommit: abc", (1, 18, 0), True),
    ("cli-version: 1.16.2\nlib-version: 1.16.2", (1, 16, 2), False),
    ("NVIDIA Container Toolkit CLI version 1.17.8-rc.1", (1, 17, 8), False),  # a pre-release predates its fix
    ("NVIDIA Container Toolkit CLI version 2.0.0", (2, 0, 0), True),
])
def test_toolkit_version_parsing_and_minimum(text, version, ok):
    parsed = parse_toolkit_version(text)
    assert parsed is not None and tuple(parsed[:3]) == version
    assert parsed.at_least((1, 17, 8)) is ok
    if ok:
        assert check_gpu_support(probe=lambda: {"/usr/bin/nvidia-ctk": parsed}) == parsed
    else:
        with pytest.raises(GpuUnsupported) as err:
            check_gpu_support(probe=lambda: {"/usr/bin/nvidia-ctk": parsed})
        assert err.value.reason == "gpu_toolkit_too_old" and "older than 1.17.8" in err.value.message


def test_toolkit_probe_runs_the_binaries_on_path(tmp_path, monkeypatch):
    def fake(name: str, out: str) -> None:
        p = tmp_path / name
        p.write_text(f"#!/bin/sh\necho '{out}'\n")
        p.chmod(0o755)

    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    fake("nvidia-ctk", "NVIDIA Container Toolkit CLI version 1.17.8")
    assert nvidia_toolkit_version() == ToolkitVersion(1, 17, 8)
    assert RuntimeFeature.GPU in DockerRuntime(DOCKER_HOST).features
    fake("nvidia-container-runtime-hook", "NVIDIA Container Runtime Hook version 1.17.7")  # the oldest counts
    assert nvidia_toolkit_version() == ToolkitVersion(1, 17, 7)
    with pytest.raises(GpuUnsupported) as err:
        check_gpu_support()
    assert err.value.reason == "gpu_toolkit_too_old" and "nvidia-container-runtime-hook 1.17.7" in err.value.message
    assert RuntimeFeature.GPU not in DockerRuntime(DOCKER_HOST).features
