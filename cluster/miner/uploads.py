"""The upload stage of an organic job: send files under ``/output`` to the URLs the user
presigned (HTTP PUT or POST per file, or one zip of all of ``/output``), and return what each
target answered.

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
  ``allow_private_networks`` is set (:mod:`cluster.miner.fetch`): a job must not make the miner
  POST to its own services;
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

from cluster.errors import TransferStopped, UploadError
from cluster.miner.fetch import CHUNK, RETRY_STATUSES, Retry, Stage, http_client
from cluster.protocol.job_io import ZIP_RESPONSE_PATH, PostUpload, PutUpload, UploadResponse, ZipUpload, redact_url

AnyUpload = PutUpload | PostUpload | ZipUpload


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
                        while chunk := src.read(CHUNK):
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

    Raises :class:`UploadError` (its ``reason`` one of ``UploadError.REASONS``; its message names
    the file, the target (redacted), the cause and the fix) for the first upload that fails
    after its retries (the others are stopped). ``still_current`` is asked once before anything
    is sent (a superseded attempt must not upload); ``scratch_dir`` holds the whole-output zip
    (default: the system temp dir, never ``output_dir``, which is size-capped and would contain
    its own zip).
    """
    if not uploads:
        return []
    if still_current is not None and not still_current():
        raise UploadError("superseded", "this attempt of the job was superseded; its outputs are not uploaded")
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
            with http_client(allow_private_networks=allow_private_networks, timeout_s=timeout_s,
                             follow_redirects=False) as client, \
                    ThreadPoolExecutor(max_parallel, thread_name_prefix="upload") as pool:
                ctx = _Ctx(client, body_cap_bytes, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
                           deadline_s=deadline_s, cancel=cancel, clock=clock)
                futures = [pool.submit(ctx.guarded, u, src, zip_path) for u, src in zip(uploads, sources)]
                results, errors = [], []
                for future in futures:
                    try:
                        results.append(future.result())
                    except Exception as exc:  # noqa: BLE001 - re-raised below, first one wins
                        ctx.stop.set()
                        errors.append(exc)
                if errors:
                    first = next((e for e in errors if not isinstance(e, TransferStopped)), None)
                    raise first or UploadError("upload_failed", "stopped because another upload failed")
                return results
        finally:
            for src in sources:
                if src is not None:
                    src.close()


class _Ctx(Stage):
    """The uploads of one :func:`upload_outputs` call: their client, retry policy and deadline."""

    def __init__(self, client: httpx.Client, body_cap: int, **stage) -> None:
        super().__init__(**stage)
        self.client, self.body_cap = client, body_cap

    def alive(self, what: str) -> None:
        halt = self.halted()
        if halt == "cancelled":
            raise UploadError("cancelled", f"upload of {what}: the job was cancelled")
        if halt == "timeout":
            raise UploadError("timeout", f"upload of {what} ran past the upload stage's time limit; upload less "
                              "or ask for a longer upload limit")

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
        with (open(zip_path, "rb") if is_zip else src) as body:
            size = os.fstat(body.fileno()).st_size

            def attempt() -> UploadResponse | Retry:
                body.seek(0)
                headers, timeout = dict(up.headers), self.timeout()
                if isinstance(up, PutUpload) or (is_zip and up.method == "PUT"):
                    request = self.client.build_request("PUT", up.url, content=body, headers=headers, timeout=timeout)
                else:
                    filename = up.filename if is_zip else up.path.rsplit("/", 1)[-1]
                    request = self.client.build_request("POST", up.url, data=up.form_fields, headers=headers,
                                                        files={"file": (filename, body)}, timeout=timeout)
                resp = self.client.send(request, stream=True)
                try:
                    text, truncated = self._read_capped(resp)
                finally:
                    resp.close()
                code = resp.status_code
                if code in RETRY_STATUSES:
                    return Retry(f"HTTP {code}: {text[:200]}")
                if not 200 <= code < 300:
                    raise UploadError("upload_failed", f"upload of {what} to {shown} answered HTTP {code}: "
                                      f"{text[:500]!r}; check that the URL is presigned for {request.method}, "
                                      "unexpired, and that headers/form fields match what was signed",
                                      status_code=code)
                return UploadResponse(path=ZIP_RESPONSE_PATH if is_zip else up.path, status_code=code,
                                      headers=dict(resp.headers.items()), body=text, body_truncated=truncated,
                                      bytes_sent=size)

            return self.retry(
                attempt, before=lambda: self.alive(what),
                refused=lambda exc: UploadError("upload_failed", f"upload of {what}: {exc}"),
                exhausted=lambda tries, last: UploadError(
                    "upload_failed", f"upload of {what} to {shown} failed after {tries} tries ({last}); check that "
                    "the target is up and reachable from miners"))

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
