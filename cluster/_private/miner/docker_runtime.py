"""Container runtime on a Docker engine via docker-py (DESIGN §1 point 4, §3)."""

from __future__ import annotations

import time

import docker
import docker.errors
import requests.exceptions

from cluster._private.miner.runtime import ContainerOutcome, ContainerRun, ContainerRuntime, ImageUnavailable, RuntimeFeature
from cluster.errors import EngineError


class DockerRuntime(ContainerRuntime):
    features = (RuntimeFeature.NO_NETWORK | RuntimeFeature.READ_ONLY_ROOT | RuntimeFeature.MEMORY_LIMIT
                | RuntimeFeature.CPU_LIMIT | RuntimeFeature.PIDS_LIMIT | RuntimeFeature.DROP_CAPABILITIES)
    # GPU is added once device_requests and the toolkit-version check exist (issue 3).

    def __init__(self, base_url: str) -> None:
        # API 1.41 is what Debian's engine speaks; docker-py negotiates down from "auto".
        self.client = docker.DockerClient(base_url=base_url, version="auto", timeout=60)

    def ping(self) -> None:
        try:
            self.client.ping()
        except Exception as exc:
            raise EngineError(f"container engine at {self.client.api.base_url} does not answer: {exc}") from exc

    def run(self, run: ContainerRun) -> ContainerOutcome:
        try:
            self.client.images.get(run.image)
        except docker.errors.ImageNotFound as exc:
            raise ImageUnavailable(f"image {run.image} is not present on this miner") from exc
        try:
            container = self.client.containers.create(
                run.image, run.command, environment=run.env, user=run.user, labels=run.labels,
                network_mode="none", read_only=True, cap_drop=["ALL"], security_opt=["no-new-privileges"],
                mem_limit=f"{run.memory_mb}m", memswap_limit=f"{run.memory_mb}m",  # no swap escape
                nano_cpus=run.cpus_milli * 1_000_000, pids_limit=run.pids,
                tmpfs={"/tmp": f"size={run.tmp_mb}m,mode=1777"},
                volumes={str(run.artifacts_host_dir): {"bind": run.artifacts_dir, "mode": "rw"}},
                detach=True,
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
                    # over a unix socket a wait timeout surfaces as ConnectionError (DESIGN §3);
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
            stdout, out_cut = _capped(container.logs(stdout=True, stderr=False), run.log_max_bytes)
            stderr, err_cut = _capped(container.logs(stdout=False, stderr=True), run.log_max_bytes)
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


def _capped(data: bytes, cap: int) -> tuple[str, bool]:
    """Keep the head and the tail when over ``cap`` bytes: errors usually sit at the end."""
    if len(data) <= cap:
        return data.decode("utf-8", "replace"), False
    half = cap // 2
    marker = f"\n[... {len(data) - 2 * half} bytes cut ...]\n".encode()
    return (data[:half] + marker + data[-half:]).decode("utf-8", "replace"), True
