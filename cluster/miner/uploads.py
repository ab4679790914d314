"""The upload stage of an organic job: send files under ``/output`` to the URLs the user
presigned, and return what each target answered (DESIGN §5).

Why it looks the way it does:

* the output directory was written by an untrusted container. A job can leave a symlink
  ``/output/result -> /etc/shadow`` (or ``-> /home/miner/.bittensor``) for the agent to
  follow, or a FIFO that blocks a reader forever. So every path is opened component by
  component with ``O_NOFOLLOW`` relative to the directory above it, and only regular files are
  sent; the whole-output zip walks without following links and skips anything else;
* presigned targets are strict about framing: S3 refuses chunked PUT bodies, so bodies are
  sent from real files (httpx then sets ``Content-Length``); a presigned POST wants the policy
  fields *before* the file, so the multipart form is ``form_fields`` in order, then ``file``;
* uploads are retried with exponential backoff on connection errors and 408/429/5xx only; a
  4xx (expired or wrongly signed URL) will not get better and fails at once, quoting the
  target's error body so the user can see S3's reason;
* a URL (or redirect) resolving to a loopback, private or link-local address is refused unless
  ``allow_private_networks`` is set: a job must not make the miner POST to its own services;
* the target's answer (status, headers, body up to ``body_cap_bytes``) is returned so the user
  gets e.g. the ETag S3 assigned; URLs are redacted in messages (their query is a signature).
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import httpx

from cluster.miner.volumes import PrivateAddress, refuse_private_addresses
from cluster.protocol.job_io import ZIP_RESPONSE_PATH, PostUpload, PutUpload, UploadResponse, ZipUpload, redact_url

AnyUpload = PutUpload | PostUpload | ZipUpload
REASONS = ("upload_failed", "timeout", "cancelled", "superseded", "miner_io_error")
"""``miner_io_error`` (the miner could not write the zip) is the miner's fault; the rest are the job's."""
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 1 << 16


class UploadError(Exception):
    """An upload failed. ``reason`` is one of :data:`REASONS`; ``message`` names the file, the
    target (redacted), the cause and the fix."""

    def __init__(self, reason: str, message: str, *, status_code: int | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.status_code = status_code


class _Retryable(Exception):
    pass


def open_output_file(output_dir: Path, rel: str) -> BinaryIO:
    """Open ``output_dir/rel`` for reading without following any link; only regular files."""
    parts = rel.split("/")
    dir_fd = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                fd = os.open(part, flags, dir_fd=dir_fd)
            except FileNotFoundError:
                raise UploadError("upload_failed", f"output file {rel!r} does not exist; the job must write "
                                  f"/output/{rel} before it exits") from None
            except OSError as exc:  # ELOOP (a link), ENOTDIR (a file where a directory should be), ...
                raise UploadError("upload_failed", f"output path {rel!r} is not a plain file path: "
                                  f"{'/'.join(parts[:i + 1])!r} is a symbolic link or not a directory "
                                  f"({exc.strerror}); only regular files are uploaded") from None
            os.close(dir_fd)
            dir_fd = fd
        if not stat.S_ISREG(os.fstat(dir_fd).st_mode):
            raise UploadError("upload_failed", f"output {rel!r} is not a regular file (a directory, FIFO or device); "
                              "only regular files are uploaded")
        os.set_blocking(dir_fd, True)
        fh = os.fdopen(dir_fd, "rb")
        dir_fd = -1
        return fh
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)


def zip_output_dir(output_dir: Path, dest: Path) -> int:
    """Write a zip of every directory and regular file under ``output_dir`` (links and special
    files are skipped, never followed) to ``dest``; return the number of files zipped."""
    count = 0
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for dirpath, dirnames, filenames in os.walk(output_dir, followlinks=False):
            base = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not (base / d).is_symlink())
            rel_dir = base.relative_to(output_dir).as_posix()
            if rel_dir != "." and not filenames and not dirnames:
                zf.writestr(zipfile.ZipInfo(rel_dir + "/"), b"")
            for name in sorted(filenames):
                rel = (base / name).relative_to(output_dir).as_posix()
                try:
                    src = open_output_file(output_dir, rel)
                except UploadError:
                    continue  # a link, FIFO, device or socket: not part of the output
                with src:
                    st = os.fstat(src.fileno())
                    info = zipfile.ZipInfo(rel, time.gmtime(min(max(st.st_mtime, 315532800), 4354819199))[:6])
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = (stat.S_IFREG | 0o644) << 16
                    info.file_size = st.st_size
                    with zf.open(info, "w", force_zip64=st.st_size > 0x7FFFFFFF) as out:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                count += 1
    return count


def upload_outputs(uploads: Sequence[AnyUpload], output_dir: Path, *, retries: int = 3, backoff_s: float = 0.5,
                   timeout_s: float = 60.0, body_cap_bytes: int = 16384, max_parallel: int = 3,
                   deadline_s: float | None = None, cancel: threading.Event | None = None,
                   still_current: Callable[[], bool] | None = None, scratch_dir: Path | None = None,
                   allow_private_networks: bool = False, clock: Callable[[], float] = time.monotonic,
                   ) -> list[UploadResponse]:
    """Send every upload (a few at a time); return the targets' answers in ``uploads`` order.

    Raises :class:`UploadError` for the first upload that fails after its retries (the others
    are stopped). ``still_current`` is asked once before anything is sent (a superseded attempt
    must not upload); ``scratch_dir`` holds the whole-output zip (default: the system temp dir,
    never ``output_dir``, which is size-capped and would contain its own zip).
    """
    if not uploads:
        return []
    if still_current is not None and not still_current():
        raise UploadError("superseded", "this attempt of the job was superseded; its outputs are not uploaded")
    deadline = None if deadline_s is None else clock() + deadline_s
    stop = threading.Event()
    sources: list[BinaryIO | None] = []
    with tempfile.TemporaryDirectory(prefix="rayhorde-upload-", dir=scratch_dir) as scratch:
        try:
            for u in uploads:  # every file is checked before anything is sent
                sources.append(None if isinstance(u, ZipUpload) else open_output_file(output_dir, u.path))
            zip_path = Path(scratch) / "output.zip"
            if any(isinstance(u, ZipUpload) for u in uploads):
                try:
                    zip_output_dir(output_dir, zip_path)
                except OSError as exc:
                    raise UploadError("miner_io_error", f"the miner could not zip /output ({exc})") from None
            hooks = {} if allow_private_networks else {"request": [refuse_private_addresses]}
            with httpx.Client(follow_redirects=False, timeout=timeout_s, event_hooks=hooks,
                              headers={"User-Agent": "rayhorde-miner"}) as client, \
                    ThreadPoolExecutor(max_parallel, thread_name_prefix="upload") as pool:
                ctx = _Ctx(client, retries, backoff_s, timeout_s, body_cap_bytes, deadline, cancel, stop, clock)
                futures = [pool.submit(ctx.guarded, u, src, zip_path) for u, src in zip(uploads, sources)]
                results, errors = [], []
                for future in futures:
                    try:
                        results.append(future.result())
                    except Exception as exc:  # noqa: BLE001 - re-raised below, first one wins
                        stop.set()
                        errors.append(exc)
                if errors:
                    first = next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
                    raise first
                return results
        finally:
            for src in sources:
                if src is not None:
                    src.close()


class _Stopped(UploadError):
    def __init__(self) -> None:
        super().__init__("upload_failed", "stopped because another upload failed")


class _Ctx:
    def __init__(self, client: httpx.Client, retries: int, backoff_s: float, timeout_s: float, body_cap: int,
                 deadline: float | None, cancel: threading.Event | None, stop: threading.Event,
                 clock: Callable[[], float]) -> None:
        self.client, self.retries, self.backoff_s, self.timeout_s = client, retries, backoff_s, timeout_s
        self.body_cap, self.deadline, self.cancel, self.stop, self.clock = body_cap, deadline, cancel, stop, clock

    def alive(self, what: str) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise UploadError("cancelled", f"upload of {what}: the job was cancelled")
        if self.deadline is not None and self.clock() > self.deadline:
            raise UploadError("timeout", f"upload of {what} ran past the upload stage's time limit; upload less "
                              "or ask for a longer upload limit")
        if self.stop.is_set():
            raise _Stopped()

    def guarded(self, up: AnyUpload, src: BinaryIO | None, zip_path: Path) -> UploadResponse:
        try:
            return self.send(up, src, zip_path)
        except BaseException:
            self.stop.set()  # the first failure stops the other uploads at their next step
            raise

    def send(self, up: AnyUpload, src: BinaryIO | None, zip_path: Path) -> UploadResponse:
        is_zip = isinstance(up, ZipUpload)
        what = "the /output zip" if is_zip else f"/output/{up.path}"
        shown = redact_url(up.url)
        failures, last = 0, ""
        with (open(zip_path, "rb") if is_zip else src) as body:
            size = os.fstat(body.fileno()).st_size
            while True:
                self.alive(what)
                body.seek(0)
                timeout = self.timeout_s if self.deadline is None else max(
                    0.001, min(self.timeout_s, self.deadline - self.clock()))
                headers = dict(up.headers)
                if isinstance(up, PutUpload) or (is_zip and up.method == "PUT"):
                    request = self.client.build_request("PUT", up.url, content=body, headers=headers, timeout=timeout)
                else:
                    filename = up.filename if is_zip else up.path.rsplit("/", 1)[-1]
                    request = self.client.build_request("POST", up.url, data=up.form_fields, headers=headers,
                                                        files={"file": (filename, body)}, timeout=timeout)
                try:
                    resp = self.client.send(request, stream=True)
                    try:
                        text, truncated = self._read_capped(resp)
                    finally:
                        resp.close()
                    code = resp.status_code
                    if code in RETRY_STATUSES:
                        raise _Retryable(f"HTTP {code}: {text[:200]}")
                    if not 200 <= code < 300:
                        raise UploadError("upload_failed", f"upload of {what} to {shown} answered HTTP {code}: "
                                          f"{text[:500]!r}; check that the URL is presigned for {request.method}, "
                                          "unexpired, and that headers/form fields match what was signed",
                                          status_code=code)
                    return UploadResponse(path=ZIP_RESPONSE_PATH if is_zip else up.path, status_code=code,
                                          headers=dict(resp.headers.items()), body=text, body_truncated=truncated,
                                          bytes_sent=size)
                except (_Retryable, httpx.TransportError) as exc:
                    last = str(exc) or type(exc).__name__
                except PrivateAddress as exc:
                    raise UploadError("upload_failed", f"upload of {what}: {exc}") from None
                failures += 1
                if failures > self.retries:
                    raise UploadError("upload_failed", f"upload of {what} to {shown} failed after {failures} tries "
                                      f"({last}); check that the target is up and reachable from miners")
                if self.stop.wait(self.backoff_s * 2 ** (failures - 1)):
                    raise _Stopped()

    def _read_capped(self, resp: httpx.Response) -> tuple[str, bool]:
        buf = bytearray()
        truncated = False
        for chunk in resp.iter_bytes():
            room = self.body_cap - len(buf)
            if len(chunk) > room:
                buf += chunk[:room]
                truncated = True
                break
            buf += chunk
        return buf.decode("utf-8", errors="replace"), truncated
