"""The volumes stage of an organic job: fetch a job's inputs into a directory the agent then
bind-mounts read-only at ``/volume``. Volume types: inline zip (base64), HTTP single file, zip
URL, Hugging Face repository (revision, ``allow_patterns``); several at once.

Everything here handles bytes chosen by a stranger, on the miner's disk, so nothing a remote
party *declares* is trusted on its own:

* sizes: a ``Content-Length`` (or a zip entry's declared size) over the cap is refused before a
  byte is written, because that is cheap and gives a clear message; but a server can omit or
  understate it and a zip can lie about what an entry inflates to (a zip bomb), so bytes are
  also counted while they are written and the stage aborts the moment a cap is passed;
* names: a zip entry may say ``../../etc/passwd``, ``/etc/passwd`` or be a unix symlink
  (encoded in ``external_attr``); such archives are refused outright rather than "fixed", and
  files are created with ``O_EXCL | O_NOFOLLOW`` so nothing is ever written through a link;
  Hub file names get the same check as zip entries (a hostile Hub mirror is still hostile);
* where: a URL (or a redirect) that resolves to a loopback, private or link-local address is
  refused unless ``allow_private_networks`` is set (:mod:`cluster.miner.fetch`), so a job cannot
  make the miner fetch from its own services and mount the answer into the container;
* failure leaves nothing behind: downloads go to a staging directory next to ``root`` and
  everything under ``root`` is removed if any volume fails, so a half-prepared input never
  reaches a container.

Downloads retry with exponential backoff on connection errors and 408/429/5xx, resume with an
HTTP ``Range`` request (guarded by ``If-Range`` so a changed object restarts from zero), and run
``max_parallel`` at a time. Hugging Face repositories are fetched with plain HTTP against the
Hub API that ``huggingface_hub`` uses: ``GET {endpoint}/api/{models|datasets|spaces}/{repo_id}/
revision/{revision}`` lists the files (``siblings``), then ``GET {endpoint}/[datasets/|spaces/]
{repo_id}/resolve/{commit}/{filename}`` fetches each, pinned to the listed commit.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import TransferStopped, VolumeError
from cluster.miner.fetch import CHUNK, RETRY_STATUSES, Retry, Stage, http_client
from cluster.protocol.job_io import (HttpFileVolume, HuggingFaceVolume, InlineZipVolume, ZipUrlVolume,
                                     check_volume_layout, redact_url, safe_relative_path)

AnyVolume = InlineZipVolume | HttpFileVolume | ZipUrlVolume | HuggingFaceVolume
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
_HF_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA = re.compile(r"^[0-9a-f]{40}$")


class VolumeLimits(BaseModel):
    """Caps for one job's volumes, all volumes together (from the executor class)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_download_bytes: int = Field(gt=0, description="bytes fetched over the network (or inline), in total")
    max_unpacked_bytes: int = Field(gt=0, description="bytes written under the volume root, in total")
    max_files: int = Field(gt=0, description="files and directories created under the volume root")
    max_parallel: int = Field(default=3, ge=1, le=32)
    retries: int = Field(default=3, ge=0, le=20, description="retries after the first try, per download")
    backoff_s: float = Field(default=0.5, ge=0, description="first retry delay; doubles each retry")
    timeout_s: float = Field(default=30.0, gt=0, description="per network operation (connect, each read)")
    allow_private_networks: bool = Field(default=False, description="let URLs reach loopback/private addresses "
                                         "(local test stacks only)")


class PreparedVolume(BaseModel):
    path: str
    type: str
    files: int = 0
    unpacked_bytes: int = 0
    downloaded_bytes: int = 0


class _Run(Stage):
    """State shared by the workers of one :func:`prepare_volumes` call."""

    def __init__(self, root: Path, staging: Path, limits: VolumeLimits, deadline_s: float | None,
                 cancel: threading.Event | None, clock: Callable[[], float]) -> None:
        super().__init__(retries=limits.retries, backoff_s=limits.backoff_s, timeout_s=limits.timeout_s,
                         deadline_s=deadline_s, cancel=cancel, clock=clock)
        self.root, self.staging, self.limits = root, staging, limits
        self.lock = threading.Lock()
        self.errors: list[Exception] = []
        self.downloaded = self.unpacked = self.files = 0
        self.stats: dict[str, PreparedVolume] = {}
        self.client = http_client(allow_private_networks=limits.allow_private_networks, timeout_s=limits.timeout_s,
                                  follow_redirects=True, headers={"Accept-Encoding": "identity"})

    # ------------------------------------------------------------------ budget and liveness
    def alive(self, vol: AnyVolume) -> None:
        halt = self.halted()
        if halt == "cancelled":
            raise VolumeError("cancelled", f"volume {vol.path!r}: the job was cancelled while its volumes downloaded")
        if halt == "timeout":
            raise VolumeError("timeout", f"volume {vol.path!r}: the download stage ran past its time limit; use "
                              "smaller inputs or ask for a longer download limit")

    def count(self, vol: AnyVolume, *, downloaded: int = 0, unpacked: int = 0, files: int = 0,
              declared: bool = False) -> None:
        """Add to the totals (or, with ``declared``, only check that adding would fit)."""
        lim, how = self.limits, "would reach (by declared sizes)" if declared else "reached"
        bigger = "use smaller inputs or an executor class with a larger volume cap"
        with self.lock:
            d, u, f = self.downloaded + downloaded, self.unpacked + unpacked, self.files + files
            for value, cap, name, reason, what, fix in (
                    (d, lim.max_download_bytes, "max_download_bytes", "volume_too_large", "downloads", bigger),
                    (u, lim.max_unpacked_bytes, "max_unpacked_bytes", "volume_too_large", "unpacked files", bigger),
                    (f, lim.max_files, "max_files", "too_many_files", "volumes", "pack small files into fewer ones")):
                if value > cap:
                    unit = "files and directories" if name == "max_files" else "bytes"
                    raise VolumeError(reason, f"volume {vol.path!r}: {what} {how} {value} {unit}, over the cap of "
                                      f"{cap} ({name}); {fix}")
            if not declared:
                self.downloaded, self.unpacked, self.files = d, u, f
                st = self.stats[vol.path]
                st.downloaded_bytes += downloaded
                st.unpacked_bytes += unpacked
                st.files += files

    # ------------------------------------------------------------------ HTTP
    def download(self, vol: AnyVolume, url: str, dest: Path, headers: dict[str, str] | None = None) -> int:
        """GET ``url`` into ``dest`` with caps, retries and resume; return the file's size."""
        shown = redact_url(url)
        have, validator = 0, None
        dest.unlink(missing_ok=True)

        def attempt() -> int | Retry:
            nonlocal have, validator
            req = dict(headers or {})
            if have:
                req["Range"] = f"bytes={have}-"
                if validator:
                    req["If-Range"] = validator
            with self.client.stream("GET", url, headers=req, timeout=self.timeout()) as resp:
                code = resp.status_code
                if code in RETRY_STATUSES:
                    return Retry(f"HTTP {code}")
                if code == 416 and have:
                    start, total = -1, None  # our range is stale: start over
                elif code not in (200, 206):
                    raise VolumeError("download_failed", f"volume {vol.path!r}: {shown} answered HTTP {code}"
                                      f"{_hint(code)}", status_code=code)
                else:
                    start, total = _span(resp, have)
                if start != have:  # a full body (200), or a range we did not ask for: start over
                    self.count(vol, downloaded=-have)
                    have, validator = 0, None
                    if start != 0:
                        return Retry(f"HTTP {code} with an unusable range; restarting from byte 0")
                if validator is None or start == 0:
                    etag = resp.headers.get("ETag", "")
                    validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
                if total is not None:
                    self.count(vol, downloaded=total - have, declared=True)
                with open(dest, "ab" if have else "wb") as out:
                    for chunk in resp.iter_bytes(CHUNK):
                        self.alive(vol)
                        self.count(vol, downloaded=len(chunk))
                        out.write(chunk)
                        have += len(chunk)
                if total is not None and have < total:
                    return Retry(f"body ended after {have} of {total} bytes")
                return have

        return self.retry(
            attempt, before=lambda: self.alive(vol),
            refused=lambda exc: VolumeError("download_failed", f"volume {vol.path!r}: {exc}"),
            exhausted=lambda tries, last: VolumeError(
                "download_failed", f"volume {vol.path!r}: {shown} failed after {tries} tries ({last}); check that "
                "the server is up and the URL is reachable from miners"))

    def get_json(self, vol: AnyVolume, url: str, headers: dict[str, str], what: str) -> object:
        """A JSON document, fetched like any download (caps, retries), then not counted as input."""
        body = self.staging / f"listing-{threading.get_ident()}.json"
        try:
            self.count(vol, downloaded=-self.download(vol, url, body, headers))
            return json.loads(body.read_bytes())
        except ValueError as exc:
            raise VolumeError("download_failed", f"volume {vol.path!r}: {what} is not valid JSON ({exc})") from None
        finally:
            body.unlink(missing_ok=True)

    def mkdirs(self, vol: AnyVolume, rel: Path) -> None:
        """Create ``root/rel`` and its missing parents, world-readable, each counted as a file."""
        for p in reversed([rel, *rel.parents][:-1]):
            try:
                (self.root / p).mkdir(mode=0o755)  # atomic: of two workers, one creates and counts it
            except FileExistsError:
                continue
            os.chmod(self.root / p, 0o755)
            self.count(vol, files=1)

    # ------------------------------------------------------------------ archives
    def extract(self, vol: AnyVolume, archive: Path, target: Path) -> None:
        """Extract a zip into ``root/target`` after checking every entry, counting while writing."""
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise VolumeError("unsafe_archive", f"volume {vol.path!r}: not a valid zip archive ({exc}); "
                              "give a zip file") from None
        with zf:
            plan: list[tuple[str, zipfile.ZipInfo]] = []
            names: set[str] = set()
            dirs: set[str] = set()
            declared = 0
            for info in zf.infolist():
                rel = _check_entry(vol, info)
                if rel is None:
                    continue
                if rel in names:
                    raise VolumeError("unsafe_archive", f"volume {vol.path!r}: zip entry {info.orig_filename!r} "
                                      "appears twice; archives may name each path once")
                names.add(rel)
                parts = rel.split("/")
                dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
                if info.is_dir():
                    dirs.add(rel)
                else:
                    declared += info.file_size
                plan.append((rel, info))
            clash = sorted(n for n, i in plan if not i.is_dir() and n in dirs)
            if clash:
                raise VolumeError("unsafe_archive", f"volume {vol.path!r}: zip path {clash[0]!r} is both a file and "
                                  "a directory; fix the archive")
            self.count(vol, files=len(dirs | names), unpacked=declared, declared=True)
            for rel in sorted(dirs):
                self.mkdirs(vol, target / rel)
            for rel, info in plan:
                if not info.is_dir():
                    self._write_entry(vol, zf, info, target / rel)

    def _write_entry(self, vol: AnyVolume, zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> None:
        self.count(vol, files=1)
        fd = os.open(self.root / dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        written = 0
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                os.fchmod(out.fileno(), 0o644)
                while chunk := src.read(CHUNK):
                    self.alive(vol)
                    written += len(chunk)
                    if written > info.file_size:
                        raise VolumeError("unsafe_archive", f"volume {vol.path!r}: zip entry {info.orig_filename!r} "
                                          f"inflates past its declared {info.file_size} bytes (a zip bomb)")
                    self.count(vol, unpacked=len(chunk))
                    out.write(chunk)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
            raise VolumeError("unsafe_archive", f"volume {vol.path!r}: zip entry {info.orig_filename!r} does not "
                              f"match its declared size or checksum, or uses an unsupported format ({exc}); "
                              "rebuild the archive") from None

    def place(self, vol: AnyVolume, staged: Path, rel: str) -> None:
        """Move a downloaded file to ``root/<vol.path>/<rel>`` (or ``root/<vol.path>`` when rel is '')."""
        final = Path(vol.path, rel) if rel else Path(vol.path)
        self.count(vol, unpacked=staged.stat().st_size, files=1)
        if final.parent != Path("."):
            self.mkdirs(vol, final.parent)
        os.chmod(staged, 0o644)
        if (self.root / final).exists() or (self.root / final).is_symlink():
            raise VolumeError("invalid_volume", f"volume {vol.path!r}: {final.as_posix()!r} would be written twice")
        os.replace(staged, self.root / final)


def _check_entry(vol: AnyVolume, info: zipfile.ZipInfo) -> str | None:
    """The entry's safe relative path, None for a root entry ('./'), or VolumeError('unsafe_archive')."""
    name = info.orig_filename
    kind = stat.S_IFMT(info.external_attr >> 16)
    problem = None
    if kind == stat.S_IFLNK:
        problem = "is a symbolic link; archives may not contain links"
    elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        problem = "is a device, FIFO or socket; archives may contain only files and directories"
    elif info.flag_bits & 0x1:
        problem = "is encrypted; give an unencrypted archive"
    elif "\x00" in name:
        problem = "contains a NUL byte"
    elif name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        problem = "has an absolute path; archives may only contain relative paths inside the volume"
    elif ".." in name.replace("\\", "/").split("/"):
        problem = "escapes the volume; archives may only contain relative paths inside it"
    if problem is None:
        if not name.strip("./") and info.is_dir():
            return None
        try:
            return safe_relative_path(name, what="zip entry")
        except ValueError as exc:
            problem = f"is not a safe path ({exc})"
    raise VolumeError("unsafe_archive", f"volume {vol.path!r}: zip entry {name!r} {problem}")


def _span(resp: httpx.Response, have: int) -> tuple[int, int | None]:
    """(first byte offset of this body, total size of the object or None if undeclared)."""
    identity = resp.headers.get("Content-Encoding", "identity").lower() in ("", "identity")
    if resp.status_code == 206:
        m = re.match(r"^bytes (\d+)-(\d+)/(\d+|\*)$", resp.headers.get("Content-Range", "").strip())
        if m and identity:
            return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))
        return -1, None  # unusable partial answer: the caller restarts from zero
    length = resp.headers.get("Content-Length")
    return 0, int(length) if identity and length and length.isdigit() else None


def _hint(code: int) -> str:
    if code in (401, 403):
        return " (access denied); check that the URL is presigned and unexpired, or give a token"
    return " (not found); check the URL or repository, revision and file names" if code == 404 else "; check the URL"


def _hf_files(run: _Run, vol: HuggingFaceVolume, endpoint: str) -> list[tuple[str, str]]:
    """[(url, relative file name)] for the files of a Hub repo that match ``allow_patterns``."""
    headers = {"Authorization": f"Bearer {vol.token}"} if vol.token else {}
    api = f"{endpoint}/api/{vol.repo_type}s/{vol.repo_id}/revision/{quote(vol.revision, safe='')}"
    try:
        info = run.get_json(vol, api, headers, f"the Hub listing of {vol.repo_id}")
    except VolumeError as exc:
        if exc.status_code in (401, 403, 404):
            raise VolumeError("download_failed", f"volume {vol.path!r}: the Hub answered HTTP {exc.status_code} for "
                              f"{vol.repo_type} repository {vol.repo_id!r} at revision {vol.revision!r}: not found, "
                              "private or gated; check repo_id, repo_type and revision, and give a token with "
                              "access", status_code=exc.status_code) from None
        raise
    siblings = info.get("siblings") if isinstance(info, dict) else None
    if not isinstance(siblings, list):
        raise VolumeError("download_failed", f"volume {vol.path!r}: the Hub listing of {vol.repo_id!r} has no "
                          "file list; check hf_endpoint")
    names = [s.get("rfilename") for s in siblings if isinstance(s, dict) and isinstance(s.get("rfilename"), str)]
    if vol.allow_patterns is not None:
        pats = [p + "*" if p.endswith("/") else p for p in vol.allow_patterns]
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]
    if not names:
        raise VolumeError("download_failed", f"volume {vol.path!r}: no file of {vol.repo_id!r} matches allow_patterns "
                          f"{vol.allow_patterns}; fix the patterns")
    sha = info.get("sha")
    pinned = sha if isinstance(sha, str) and _SHA.match(sha) else vol.revision
    base = f"{endpoint}/{_HF_PREFIX[vol.repo_type]}{vol.repo_id}/resolve/{quote(pinned, safe='')}"
    out = []
    for name in names:
        try:
            rel = safe_relative_path(name, what="Hub file name")
        except ValueError as exc:
            raise VolumeError("unsafe_archive", f"volume {vol.path!r}: {exc}; refusing the repository") from None
        out.append((f"{base}/{quote(name)}", rel))
    run.count(vol, files=len(out), declared=True)
    return out


def prepare_volumes(volumes: Sequence[AnyVolume], root: Path, *, limits: VolumeLimits, hf_endpoint: str | None = None,
                    deadline_s: float | None = None, cancel: threading.Event | None = None,
                    clock: Callable[[], float] = time.monotonic) -> list[PreparedVolume]:
    """Fetch every volume into ``root/<path>`` (``root`` must be absent or empty; it is created).

    Raises :class:`VolumeError` on the first failure, after removing everything under ``root``
    (and ``root`` itself if this call created it). ``deadline_s`` bounds the whole stage;
    ``cancel`` aborts it. ``hf_endpoint`` defaults to ``$HF_ENDPOINT``, then the public Hub.
    """
    try:
        check_volume_layout(list(volumes))
    except ValueError as exc:
        raise VolumeError("invalid_volume", str(exc)) from None
    endpoint = (hf_endpoint or os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
    created = not root.exists()
    if not created and any(root.iterdir()):
        raise ValueError(f"volume root {root} is not empty")
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.staging-", dir=root.parent))
    run = _Run(root, staging, limits, deadline_s, cancel, clock)
    run.stats = {v.path: PreparedVolume(path=v.path, type=v.type) for v in volumes}
    try:
        with ThreadPoolExecutor(limits.max_parallel, thread_name_prefix="volume") as pool:
            listings = {v.path: pool.submit(_hf_files, run, v, endpoint)
                        for v in volumes if isinstance(v, HuggingFaceVolume)}
            tasks: list[tuple[AnyVolume, str, str]] = []
            for vol in volumes:
                if isinstance(vol, HuggingFaceVolume):
                    tasks += [(vol, url, rel) for url, rel in _guard(run, listings[vol.path].result)]
                else:
                    tasks.append((vol, getattr(vol, "url", ""), ""))
            for future in [pool.submit(_guard, run, _fetch, run, vol, url, rel, i) for i, (vol, url, rel) in
                           enumerate(tasks)]:
                future.result()
        if run.errors:
            raise run.errors[0]
        return [run.stats[v.path] for v in volumes]
    except BaseException:
        run.stop.set()
        _empty(root, remove=created)
        if run.errors:
            raise run.errors[0] from None
        raise
    finally:
        run.client.close()
        shutil.rmtree(staging, ignore_errors=True)


def _guard(run: _Run, fn: Callable, *args):
    """Run ``fn`` in a worker; record the first real error (VolumeError, OSError such as a full
    disk, or a bug) and stop the other workers."""
    try:
        return fn(*args)
    except TransferStopped:
        return []
    except Exception as exc:
        if isinstance(exc, OSError):
            exc = VolumeError("miner_io_error", f"the miner could not write a volume ({exc})")
        with run.lock:
            run.errors.append(exc)
        run.stop.set()
        return []


def _fetch(run: _Run, vol: AnyVolume, url: str, rel: str, index: int) -> None:
    run.alive(vol)
    staged = run.staging / f"{index}.part"
    if isinstance(vol, InlineZipVolume):
        data = vol.zip_bytes()
        run.count(vol, downloaded=len(data))
        staged.write_bytes(data)
    else:
        headers = {"Authorization": f"Bearer {vol.token}"} if isinstance(vol, HuggingFaceVolume) and vol.token else {}
        run.download(vol, url, staged, headers)
    if isinstance(vol, (InlineZipVolume, ZipUrlVolume)):
        run.mkdirs(vol, Path(vol.path))
        run.extract(vol, staged, Path(vol.path))
        staged.unlink()
    else:
        run.place(vol, staged, rel)


def _empty(root: Path, *, remove: bool) -> None:
    shutil.rmtree(root, ignore_errors=True)
    if not remove:
        root.mkdir(mode=0o755)
