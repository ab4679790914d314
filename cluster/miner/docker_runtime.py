"""Container runtime on a Docker engine via docker-py.

Every job container is confined: no network, a read-only root, the unprivileged user the miner
configures, memory (without swap), CPU and PID limits, all capabilities dropped, no new
privileges, and only its artifacts, ``/output`` and (read-only) ``/volume`` directories mounted
from the host.

Images: :meth:`DockerRuntime.pull` is the image-pull stage, with its own limit. An image
named by tag is pulled only when absent; one named by digest is pulled when absent and its
``RepoDigests`` must then record that digest. GPU runs (``ContainerRun.gpus > 0``) go through
docker's ``device_requests`` and only after :func:`check_gpu_support` passes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import docker
import docker.auth
import docker.errors
import docker.types
import requests.exceptions

from cluster.errors import EngineError, GpuUnsupported, ImagePullFailed, ImageUnavailable, InvalidImageReference
from cluster.miner.gpu import check_gpu_support
from cluster.miner.runtime import REQUIRED, ContainerOutcome, ContainerRun, ContainerRuntime, RuntimeFeature
from cluster.protocol.images import Reference, digest_matches, parse_reference

PULL_THREAD_PREFIX = "rayhorde-pull"


class DockerRuntime(ContainerRuntime):
    features = REQUIRED  # every confinement a job container needs
    # RuntimeFeature.GPU is added per instance in __init__ when the NVIDIA toolkit check passes.

    def __init__(self, base_url: str) -> None:
        # API 1.41 is what Debian's engine speaks; docker-py negotiates down from "auto".
        self.base_url = base_url
        self.client = docker.DockerClient(base_url=base_url, version="auto", timeout=60)
        self.gpu_refusal: GpuUnsupported | None = None
        try:
            check_gpu_support()
            self.features = type(self).features | RuntimeFeature.GPU
        except GpuUnsupported as exc:
            self.gpu_refusal = exc
            self.features = type(self).features

    # ------------------------------------------------------------------------------- images
    def pull(self, image: str, *, timeout_s: float, auth: dict[str, str] | None = None) -> str:
        """Make ``image`` present and return its local image id (``sha256:...``).

        A tag is pulled only when absent (a present tag is used as is); a digest is pulled when
        absent and must then appear in the image's ``RepoDigests``. ``auth`` is docker's auth
        config (``{"username", "password"}``, optionally ``"serveraddress"``), sent to dockerd
        for this pull only; without it no credentials are sent. The pull stops being waited for
        at ``timeout_s``: the engine connection is shut down, so dockerd cancels the pull, and no
        thread is left blocked. Raises :class:`ImagePullFailed` (``image_pull_failed``,
        ``image_pull_timed_out``, ``image_digest_mismatch``) or :class:`EngineError`.
        """
        try:
            ref = parse_reference(image)
        except InvalidImageReference as exc:
            raise ImagePullFailed("image_pull_failed", str(exc)) from exc
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        attrs = self._inspect(ref.pull_name())
        if attrs is not None and (ref.digest is None or digest_matches(attrs.get("RepoDigests"), ref.repository,
                                                                         ref.digest)):
            return str(attrs["Id"])
        _Pull(self, image, ref, timeout_s, auth).run()
        attrs = self._inspect(ref.pull_name())
        if attrs is None:
            raise ImagePullFailed("image_pull_failed", f"the engine reported pulling {image} but has no image "
                                  f"{ref.pull_name()}; retry the job")
        if ref.digest and not digest_matches(attrs.get("RepoDigests"), ref.repository, ref.digest):
            try:
                self.client.api.remove_image(ref.pull_name())
            except docker.errors.APIError:
                pass
            raise ImagePullFailed("image_digest_mismatch", f"pulled {ref.pull_name()} but the image's recorded digests "
                                  f"{attrs.get('RepoDigests') or []} do not include {ref.digest}; the image was "
                                  "removed. The registry served other content than the digest names")
        return str(attrs["Id"])

    def _inspect(self, name: str) -> dict[str, Any] | None:
        try:
            return self.client.api.inspect_image(name)
        except docker.errors.NotFound:  # ImageNotFound included
            return None
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise EngineError(f"container engine at {self.base_url} failed to inspect image {name}: {exc}") from exc

    def ping(self) -> None:
        try:
            self.client.ping()
        except Exception as exc:
            raise EngineError(f"container engine at {self.client.api.base_url} does not answer: {exc}") from exc

    def run(self, run: ContainerRun) -> ContainerOutcome:
        gpu: dict[str, Any] = {}
        if run.gpus > 0:
            check_gpu_support()  # GpuUnsupported before anything is created
            gpu["device_requests"] = [docker.types.DeviceRequest(count=run.gpus, capabilities=[["gpu"]])]
        try:
            self.client.images.get(run.image)
        except docker.errors.ImageNotFound as exc:
            raise ImageUnavailable(f"image {run.image} is not present on this miner; pull it first") from exc
        mounts = {str(run.artifacts_host_dir): {"bind": run.artifacts_dir, "mode": "rw"}}
        if run.output_host_dir is not None:
            mounts[str(run.output_host_dir)] = {"bind": "/output", "mode": "rw"}
        if run.volume_host_dir is not None:
            mounts[str(run.volume_host_dir)] = {"bind": "/volume", "mode": "ro"}
        try:
            container = self.client.containers.create(
                run.image, run.command, environment=run.env, user=run.user, labels=run.labels,
                network_mode="none", read_only=True, cap_drop=["ALL"], security_opt=["no-new-privileges"],
                mem_limit=f"{run.memory_mb}m", memswap_limit=f"{run.memory_mb}m",  # no swap escape
                nano_cpus=run.cpus_milli * 1_000_000, pids_limit=run.pids,
                tmpfs={"/tmp": f"size={run.tmp_mb}m,mode=1777"},
                volumes=mounts, detach=True, log_config=disk_log_config(run.log_max_bytes), **gpu,
            )
        except docker.errors.APIError as exc:
            raise EngineError(f"could not create the container: {exc.explanation or exc}") from exc
        try:
            started_ns = time.time_ns()
            container.start()
            deadline = time.monotonic() + run.timeout_s
            timed_out = False
            exit_code: int | None = None
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                try:
                    exit_code = int(container.wait(timeout=remaining)["StatusCode"])
                    break
                except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                    # over a unix socket docker-py reports a wait timeout as a ConnectionError, not a ReadTimeout;
                    # the loop re-checks the clock, so a real connection fault ends at the deadline too
                    continue
            if timed_out:
                try:
                    container.kill()
                except docker.errors.APIError:
                    pass  # it exited between the deadline and the kill
                exit_code = int(container.wait(timeout=30)["StatusCode"])
            finished_ns = time.time_ns()
            container.reload()
            oom = bool(container.attrs["State"].get("OOMKilled"))
            rotated = _rotated(container.attrs.get("LogPath") or "")
            stdout, out_cut = _log_of(container, run.log_max_bytes, stdout=True, rotated=rotated)
            stderr, err_cut = _log_of(container, run.log_max_bytes, stdout=False, rotated=rotated)
            return ContainerOutcome(exit_code=exit_code, oom_killed=oom, timed_out=timed_out, stdout=stdout,
                                    stderr=stderr, stdout_truncated=out_cut, stderr_truncated=err_cut,
                                    started_ns=started_ns, finished_ns=finished_ns)
        except docker.errors.APIError as exc:
            raise EngineError(f"container engine failed while running the job: {exc.explanation or exc}") from exc
        finally:
            try:
                container.remove(force=True)
            except docker.errors.APIError:
                pass

    def kill_labelled(self, label: str, value: str) -> int:
        found = self.client.containers.list(all=True, filters={"label": f"{label}={value}"})
        for c in found:
            try:
                c.remove(force=True)
            except docker.errors.APIError:
                pass
        return len(found)


class _Pull:
    """One pull on its own engine connection, in a daemon thread, waited for up to its limit.

    At the limit the caller gets ``image_pull_timed_out`` at once. If the engine has begun
    answering, the connection is shut down, which makes the thread return and dockerd cancel the
    pull; if not (dockerd answers only once the registry does), the connection's read timeout
    (limit + 1 s) ends the thread and the request. Either way nothing waits on it.
    """

    def __init__(self, rt: DockerRuntime, image: str, ref: Reference, timeout_s: float,
                 auth: dict[str, str] | None) -> None:
        self.rt, self.image, self.ref, self.timeout_s, self.auth = rt, image, ref, timeout_s, auth
        self._lock = threading.Lock()
        self._response: requests.Response | None = None
        self._abandoned = False
        self.done = threading.Event()
        self.error: str | None = None  # the engine's / registry's error text
        self.engine_error: BaseException | None = None  # the engine connection itself failed
        self.progress = "no answer from the engine yet"

    def run(self) -> None:
        thread = threading.Thread(target=self._work, name=f"{PULL_THREAD_PREFIX} {self.image}", daemon=True)
        thread.start()
        if not self.done.wait(self.timeout_s):
            self._abandon()
            raise ImagePullFailed("image_pull_timed_out", (
                f"pulling {self.image} did not finish within its {self.timeout_s:g} s limit (last progress: "
                f"{self.progress}); the registry {self.ref.domain} is slow or unreachable, or the image is too "
                "large for the limit: use a registry closer to the miners, a smaller image, or a longer pull limit"))
        if self.error is not None:
            raise pull_error(self.image, self.ref, self.error)
        if self.engine_error is not None:
            raise EngineError(f"container engine at {self.rt.base_url} failed while pulling {self.image}: "
                              f"{self.engine_error}") from self.engine_error

    def _work(self) -> None:
        version = self.rt.client.api.api_version
        api = docker.APIClient(base_url=self.rt.base_url, version=version, timeout=self.timeout_s + 1)
        response = None
        try:
            params = {"fromImage": self.ref.repository, "tag": self.ref.digest or self.ref.tag or "latest"}
            headers = {"X-Registry-Auth": docker.auth.encode_header(self.auth)} if self.auth else {}
            response = api.post(f"{api.base_url}/v{version}/images/create", params=params, headers=headers,
                                stream=True, timeout=self.timeout_s + 1)
            with self._lock:
                if self._abandoned:
                    return
                self._response = response
            if response.status_code >= 400:
                self.error = _engine_message(response)
                return
            for line in response.iter_lines():
                if self._abandoned:
                    return
                try:
                    msg = json.loads(line) if line.strip() else None
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if msg.get("error") or msg.get("errorDetail"):
                    self.error = str((msg.get("errorDetail") or {}).get("message") or msg.get("error"))
                    return
                if msg.get("status"):
                    self.progress = (f"{msg['id']}: " if msg.get("id") else "") + str(msg["status"])
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting caller, never raised in the thread
            if not self._abandoned:
                self.engine_error = exc
        finally:
            self.done.set()
            if response is not None:
                response.close()
            api.close()

    def _abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            response = self._response
        if response is None:
            return
        try:  # the same path docker-py uses to reach a response's socket (APIClient._get_raw_response_socket)
            raw = response.raw._fp.fp.raw
            getattr(raw, "_sock", raw).shutdown(socket.SHUT_RDWR)
        except Exception:  # noqa: BLE001 - best effort: the read timeout ends the thread anyway
            pass


def _engine_message(response: requests.Response) -> str:
    try:
        return str(response.json()["message"])
    except Exception:  # noqa: BLE001
        return f"HTTP {response.status_code}: {response.text[:300]}"


def pull_error(image: str, ref: Reference, text: str) -> ImagePullFailed:
    """Map dockerd's pull error text to a reason and a message with the cause and the fix."""
    low = text.lower()
    registry = ref.domain
    if "manifest verification failed" in low or "digest did not match" in low or "verification failed" in low:
        return ImagePullFailed("image_digest_mismatch", f"registry {registry} served content for {image} that does "
                               f"not hash to the requested digest ({text}); the registry, or something between it "
                               "and the miner, altered the image: do not use it")
    if "manifest unknown" in low or ("not found" in low and "manifest" in low):
        what = f"digest {ref.digest}" if ref.digest else f"tag {ref.tag or 'latest'}"
        return ImagePullFailed("image_pull_failed", f"registry {registry} has no {what} in {ref.repository} "
                               f"(manifest unknown: {text}); push the image or fix the reference")
    if ("unauthorized" in low or "no basic auth credentials" in low or "authentication required" in low
            or "access denied" in low or "denied:" in low):
        return ImagePullFailed("image_pull_failed", f"registry {registry} refused the pull of {image} "
                               f"(unauthorized: {text}); give the job credentials for {registry}, or check them")
    if "server gave http response to https client" in low:
        return ImagePullFailed("image_pull_failed", f"registry {registry} speaks plain HTTP ({text}); dockerd only "
                               "allows that for 127.0.0.0/8 and its --insecure-registry entries: serve the registry "
                               "over TLS")
    if any(s in low for s in ("connection refused", "no such host", "i/o timeout", "dial tcp", "network is unreachable",
                              "connection reset", "tls handshake timeout", "eof")):
        return ImagePullFailed("image_pull_failed", f"could not reach registry {registry} to pull {image} ({text}); "
                               "check the registry address and that the miner can reach it")
    if "toomanyrequests" in low or "rate limit" in low:
        return ImagePullFailed("image_pull_failed", f"registry {registry} rate-limits this miner ({text}); use "
                               "another registry or credentials with a higher limit")
    if "invalid reference format" in low or "invalid tag format" in low:
        return ImagePullFailed("image_pull_failed", f"the engine refused the reference {image} ({text}); fix it")
    return ImagePullFailed("image_pull_failed", f"pulling {image} from {registry} failed: {text}")


def disk_log_config(log_max_bytes: int) -> docker.types.LogConfig:
    """The engine's json-file log, capped on the miner's disk: two files of half the cap each (the
    engine rotates them), so a job that prints without pause holds at most about ``log_max_bytes``
    (plus the json framing of each line) however long it runs, and its last output is kept."""
    half = max(log_max_bytes // 2, 4096)
    return docker.types.LogConfig(type=docker.types.LogConfig.types.JSON, config={"max-size": str(half),
                                                                                  "max-file": "2"})


def _rotated(log_path: str) -> bool:
    """Whether the engine rotated the container's log away (its earliest output is gone). The
    agent shares the engine's host; elsewhere this reads False and the cut is not marked."""
    return bool(log_path) and os.path.exists(log_path + ".1")


def _log_of(container: Any, cap: int, *, stdout: bool, rotated: bool) -> tuple[str, bool]:
    """One stream of the container's log, read with at most ``cap`` bytes in memory whatever the
    engine sends: the first and the last ``cap / 2`` (errors usually sit at the end), with what
    was cut between them counted. A log the engine rotated lost its earliest output on the disk
    already: that is said first, and it counts as truncated."""
    half = cap // 2
    head, tail, total = bytearray(), bytearray(), 0
    for chunk in container.logs(stdout=stdout, stderr=not stdout, stream=True):
        total += len(chunk)
        if len(head) < half:
            take = chunk[:half - len(head)]
            head += take
            chunk = chunk[len(take):]
        tail += chunk
        if len(tail) > cap - len(head):
            del tail[:len(tail) - max(cap - len(head), half)]
    lead = b"[... earlier output rotated away on the miner's disk ...]\n" if rotated else b""
    if total <= cap:
        return (lead + head + tail).decode("utf-8", "replace"), rotated
    if len(tail) > half:
        del tail[:len(tail) - half]
    marker = f"\n[... {total - len(head) - len(tail)} bytes cut ...]\n".encode()
    return (lead + head + marker + tail).decode("utf-8", "replace"), True