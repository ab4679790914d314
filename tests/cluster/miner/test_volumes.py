"""The volumes stage against real local servers: every volume type, bytes checked end to end, and
hostile inputs refused.

An in-process threading HTTP server on 127.0.0.1 (random port) serves files with Range support
and can be told to answer 503 first, cut the connection mid-body, omit or overstate
Content-Length, or answer the Hugging Face Hub API for repositories served from a tmp dir.
Hostile archives and specs must be refused with a clear message and leave nothing behind.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import socket
import stat
import struct
import threading
import time
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

import pytest
from pydantic import TypeAdapter, ValidationError

from cluster.errors import VolumeError
from cluster.miner.volumes import VolumeLimits, prepare_volumes
from cluster.protocol.job_io import Volume

pytestmark = pytest.mark.integration

VOLUMES = TypeAdapter(list[Volume])
SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubRepo:
    dir: Path
    sha: str = SHA
    token: str | None = None
    extra_names: tuple[str, ...] = ()


class Origin:
    """What the test server serves, and what it saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        self.fail_first: dict[str, int] = {}  # path -> how many 503s before serving
        self.drop_once: dict[str, int] = {}  # path -> cut the first full response after this many bytes
        self.no_length: set[str] = set()  # body delimited by connection close
        self.declare: dict[str, int] = {}  # path -> Content-Length to claim
        self.delay_s: dict[str, float] = {}
        self.slow: set[str] = set()  # 64 KiB every 0.2 s
        self.hub: dict[tuple[str, str], HubRepo] = {}
        self.log: list[tuple[str, dict[str, str]]] = []
        self.inflight = self.max_inflight = 0

    def requests(self, path: str) -> list[dict[str, str]]:
        return [h for p, h in self.log if p == path]

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(h.path).path)
        with self.lock:
            self.log.append((path, {k.lower(): v for k, v in h.headers.items()}))
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            time.sleep(self.delay_s.get(path, 0))
            with self.lock:
                failing = self.fail_first.get(path, 0) > 0
                if failing:
                    self.fail_first[path] -= 1
            if failing:
                return self._plain(h, 503, b"try again later")
            if path.startswith("/api/") or "/resolve/" in path:
                return self._hub(h, path)
            if path not in self.files:
                return self._plain(h, 404, b"no such file")
            self._file(h, path, self.files[path])
        finally:
            with self.lock:
                self.inflight -= 1

    def _plain(self, h, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _file(self, h, path: str, data: bytes) -> None:
        etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
        start, code = 0, 200
        m = re.match(r"^bytes=(\d+)-$", h.headers.get("Range", ""))
        if m and h.headers.get("If-Range", etag) == etag:
            start, code = int(m.group(1)), 206
            if start >= len(data):
                return self._plain(h, 416, b"")
        body = data[start:]
        h.send_response(code)
        h.send_header("ETag", etag)
        h.send_header("Accept-Ranges", "bytes")
        if code == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if path in self.no_length:
            h.send_header("Connection", "close")
            h.close_connection = True
        else:
            h.send_header("Content-Length", str(self.declare.get(path, len(body))))
        h.end_headers()
        with self.lock:
            cut = self.drop_once.pop(path, None) if start == 0 else None
        if cut is not None:
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        if path in self.slow:
            for i in range(0, len(body), 1 << 16):
                h.wfile.write(body[i:i + (1 << 16)])
                h.wfile.flush()
                time.sleep(0.2)
            return
        h.wfile.write(body)

    def _hub(self, h, path: str) -> None:
        m = re.match(r"^/api/(model|dataset|space)s/(.+)/revision/([^/]+)$", path)
        r = re.match(r"^/(?:(dataset|space)s/)?(.+?)/resolve/([^/]+)/(.+)$", path)
        kind, repo_id, rev = (m.groups() if m else (r.group(1) or "model", r.group(2), r.group(3)) if r else
                              (None, None, None))
        repo = self.hub.get((kind, repo_id))
        if repo is None:
            return self._plain(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        if repo.token and h.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._plain(h, 401, b'{"error":"Invalid credentials"}', {"X-Error-Code": "RepoNotFound"})
        files = sorted(p.relative_to(repo.dir).as_posix() for p in repo.dir.rglob("*") if p.is_file())
        if m:
            if rev not in ("main", repo.sha):
                return self._plain(h, 404, b'{"error":"Revision not found"}', {"X-Error-Code": "RevisionNotFound"})
            info = {"id": repo_id, "sha": repo.sha,
                    "siblings": [{"rfilename": f} for f in files + list(repo.extra_names)]}
            return self._plain(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        if rev != repo.sha:  # the downloader pins every file to the listed commit
            return self._plain(h, 404, b'{"error":"expected the pinned commit"}')
        name = r.group(4)
        if name not in files:
            return self._plain(h, 404, b'{"error":"Entry not found"}', {"X-Error-Code": "EntryNotFound"})
        data = (repo.dir / name).read_bytes()
        if len(data) > 100_000:  # big ("LFS") files redirect to a CDN, as on the real Hub
            cdn = f"/cdn/{hashlib.sha256(data).hexdigest()}"
            with self.lock:
                self.files[cdn] = data
            return self._plain(h, 302, b"", {"Location": cdn, "X-Repo-Commit": repo.sha})
        self._file(h, path, data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self.server.origin.handle(self)

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up on purpose (over-cap refusal) is not a test failure


@contextlib.contextmanager
def serving_origin() -> Iterator[Origin]:
    """The test server on 127.0.0.1 (random port), in a thread, for the ``with`` block."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.origin = Origin()
    server.origin.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.origin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def origin():
    with serving_origin() as served:
        yield served


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "job").mkdir()
    return tmp_path / "job" / "volume"


def limits(**kw) -> VolumeLimits:
    base = dict(max_download_bytes=5_000_000, max_unpacked_bytes=5_000_000, max_files=100, max_parallel=3,
                retries=3, backoff_s=0.01, timeout_s=5, allow_private_networks=True)
    return VolumeLimits(**{**base, **kw})


def vols(*items: dict) -> list:
    return VOLUMES.validate_python(list(items))


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(root: Path, volumes: list, reason: str, match: str, **kw) -> VolumeError:
    """Run prepare_volumes, expect VolumeError(reason) matching ``match``, and nothing left behind."""
    lim = kw.pop("limits", None) or limits()
    with pytest.raises(VolumeError) as info:
        prepare_volumes(volumes, root, limits=lim, **kw)
    assert info.value.reason == reason, info.value
    assert re.search(match, info.value.message), info.value.message
    assert not root.exists(), list(root.rglob("*"))
    assert list(root.parent.iterdir()) == [], "staging files left behind"
    return info.value


# ---------------------------------------------------------------------- each type, bytes checked
def test_inline_zip(root):
    entries = {"a.txt": b"hello\n", "sub/dir/b.bin": os.urandom(5000)}
    out = prepare_volumes(vols({"type": "inline_zip", "path": "in",
                                "contents_b64": base64.b64encode(make_zip(entries)).decode()}), root, limits=limits())
    assert tree(root) == {f"in/{k}": v for k, v in entries.items()}
    assert out[0].files == 4 + 1 and out[0].unpacked_bytes == 5006  # in/, sub/, sub/dir/, two files
    mode = (root / "in/sub/dir/b.bin").stat().st_mode
    assert mode & stat.S_IROTH and (root / "in/sub").stat().st_mode & stat.S_IXOTH  # readable by the job's uid


def test_http_file(origin, root):
    data = os.urandom(300_000)
    origin.files["/data/weights.bin"] = data
    out = prepare_volumes(vols({"type": "http_file", "path": "models/w.bin", "url": origin.url + "/data/weights.bin"}),
                          root, limits=limits())
    assert tree(root) == {"models/w.bin": data}
    assert out[0].downloaded_bytes == len(data)


def test_zip_url(origin, root):
    entries = {"x/1.txt": b"one", "2.bin": os.urandom(70_000)}
    origin.files["/in.zip"] = make_zip(entries)
    prepare_volumes(vols({"type": "zip_url", "path": "z", "url": origin.url + "/in.zip"}), root, limits=limits())
    assert tree(root) == {f"z/{k}": v for k, v in entries.items()}
    assert list(root.parent.iterdir()) == [root]  # the staged archive is gone


@pytest.fixture
def model_repo(tmp_path, origin) -> HubRepo:
    d = tmp_path / "hub" / "model"
    (d / "weights").mkdir(parents=True)
    (d / "config.json").write_text('{"hidden": 8}')
    (d / "README.md").write_text("# not wanted")
    (d / "weights" / "model.bin").write_bytes(os.urandom(150_000))
    repo = HubRepo(dir=d, token="hf_secret")
    origin.hub[("model", "acme/tiny")] = repo
    return repo


def test_huggingface_model(origin, root, model_repo):
    out = prepare_volumes(vols({"type": "huggingface", "path": "hf", "repo_id": "acme/tiny", "token": "hf_secret",
                                "allow_patterns": ["*.json", "weights/"]}), root, limits=limits(),
                          hf_endpoint=origin.url)
    assert tree(root) == {"hf/config.json": b'{"hidden": 8}',
                          "hf/weights/model.bin": (model_repo.dir / "weights/model.bin").read_bytes()}
    assert out[0].files == 4  # hf/, hf/weights/ and two files
    # the URL shapes of huggingface_hub (HfApi.model_info, hf_hub_url), pinned to the listed commit
    paths = [p for p, _ in origin.log]
    assert paths[0] == "/api/models/acme/tiny/revision/main"
    assert {f"/acme/tiny/resolve/{SHA}/config.json", f"/acme/tiny/resolve/{SHA}/weights/model.bin"} <= set(paths)
    assert all(h.get("authorization") == "Bearer hf_secret" for p, h in origin.log if not p.startswith("/cdn/"))


def test_huggingface_dataset_honours_hf_endpoint_env(origin, root, tmp_path, monkeypatch):
    d = tmp_path / "hub" / "ds"
    d.mkdir(parents=True)
    (d / "train.csv").write_text("a,b\n1,2\n")
    origin.hub[("dataset", "acme/rows")] = HubRepo(dir=d)
    monkeypatch.setenv("HF_ENDPOINT", origin.url)
    prepare_volumes(vols({"type": "huggingface", "path": "ds", "repo_id": "acme/rows", "repo_type": "dataset",
                          "revision": SHA}), root, limits=limits())
    assert tree(root) == {"ds/train.csv": b"a,b\n1,2\n"}
    assert [p for p, _ in origin.log] == [f"/api/datasets/acme/rows/revision/{SHA}",
                                          f"/datasets/acme/rows/resolve/{SHA}/train.csv"]


def test_huggingface_refusals(origin, root, model_repo):
    hf = {"type": "huggingface", "path": "hf", "repo_id": "acme/tiny"}
    refused(root, vols(hf), "download_failed", r"HTTP 401 .*private or gated.*give a token", hf_endpoint=origin.url)
    refused(root, vols({**hf, "repo_id": "acme/none"}), "download_failed", r"HTTP 404.*not found",
            hf_endpoint=origin.url)
    refused(root, vols({**hf, "token": "hf_secret", "allow_patterns": ["*.onnx"]}), "download_failed",
            r"no file .* matches allow_patterns", hf_endpoint=origin.url)
    model_repo.extra_names = ("../../escape.txt",)
    refused(root, vols({**hf, "token": "hf_secret"}), "unsafe_archive", r"Hub file name .*'\.\.'",
            hf_endpoint=origin.url)


# ---------------------------------------------------------------------- several at once, parallelism
def test_several_volumes_at_once_a_few_at_a_time(origin, root, tmp_path, model_repo):
    payloads = {f"/f{i}.bin": os.urandom(20_000 + i) for i in range(5)}
    for path, data in payloads.items():
        origin.files[path] = data
        origin.delay_s[path] = 0.15
    origin.files["/in.zip"] = make_zip({"inside.txt": b"zipped"})
    spec = [{"type": "http_file", "path": f"files{p}", "url": origin.url + p} for p in payloads]
    spec += [{"type": "zip_url", "path": "z", "url": origin.url + "/in.zip"},
             {"type": "inline_zip", "path": "inline", "contents_b64": base64.b64encode(make_zip({"i": b"I"})).decode()},
             {"type": "huggingface", "path": "hf", "repo_id": "acme/tiny", "token": "hf_secret",
              "allow_patterns": ["config.json"]}]
    out = prepare_volumes(vols(*spec), root, limits=limits(max_parallel=3), hf_endpoint=origin.url)
    expected = {f"files{p}": d for p, d in payloads.items()}
    expected.update({"z/inside.txt": b"zipped", "inline/i": b"I", "hf/config.json": b'{"hidden": 8}'})
    assert tree(root) == expected
    assert [v.path for v in out] == [v["path"] for v in spec]
    assert 2 <= origin.max_inflight <= 3


def test_overlapping_volume_paths_refused(root):
    z = base64.b64encode(make_zip({"a": b"a"})).decode()
    refused(root, vols({"type": "inline_zip", "path": "data", "contents_b64": z},
                       {"type": "inline_zip", "path": "data/sub", "contents_b64": z}), "invalid_volume", "overlap")


# ---------------------------------------------------------------------- retries, resume, caps, deadline
def test_resume_after_dropped_connection(origin, root):
    data = os.urandom(400_000)
    origin.files["/big.bin"] = data
    origin.drop_once["/big.bin"] = 150_000
    prepare_volumes(vols({"type": "http_file", "path": "big.bin", "url": origin.url + "/big.bin"}), root,
                    limits=limits())
    assert (root / "big.bin").read_bytes() == data
    first, second = origin.requests("/big.bin")
    assert "range" not in first
    start = int(re.match(r"bytes=(\d+)-$", second["range"]).group(1))
    assert 0 < start <= 150_000 and second["if-range"].startswith('"')


def test_retry_after_503s(origin, root):
    origin.files["/flaky"] = b"finally"
    origin.fail_first["/flaky"] = 2
    prepare_volumes(vols({"type": "http_file", "path": "f", "url": origin.url + "/flaky"}), root, limits=limits())
    assert (root / "f").read_bytes() == b"finally" and len(origin.requests("/flaky")) == 3


def test_gives_up_after_retries(origin, root):
    origin.files["/down"] = b"never"
    origin.fail_first["/down"] = 99
    refused(root, vols({"type": "http_file", "path": "f", "url": origin.url + "/down?X-Amz-Signature=s3cr3t"}),
            "download_failed", r"failed after 3 tries \(HTTP 503\)", limits=limits(retries=2))
    assert len(origin.requests("/down")) == 3


def test_private_addresses_refused_by_default(origin, root, model_repo):
    origin.files["/f"] = b"internal"
    refused(root, vols({"type": "http_file", "path": "f", "url": origin.url + "/f"}), "download_failed",
            r"resolves to 127\.0\.0\.1, which is not a public address", limits=limits(allow_private_networks=False))
    refused(root, vols({"type": "huggingface", "path": "hf", "repo_id": "acme/tiny"}), "download_failed",
            "not a public address", hf_endpoint=origin.url, limits=limits(allow_private_networks=False))
    assert origin.log == []


def test_http_404_fails_at_once(origin, root):
    err = refused(root, vols({"type": "http_file", "path": "f", "url": origin.url + "/missing?sig=s3cr3t"}),
                  "download_failed", r"answered HTTP 404 \(not found\)")
    assert "s3cr3t" not in err.message and len(origin.requests("/missing")) == 1


def test_declared_length_over_cap_refused_before_download(origin, root):
    origin.files["/huge"] = b"x" * 1000
    origin.declare["/huge"] = 10_000_000_000
    refused(root, vols({"type": "http_file", "path": "f", "url": origin.url + "/huge"}), "volume_too_large",
            r"would reach \(by declared sizes\) 10000000000 bytes, over the cap of 5000000 \(max_download_bytes\)")
    assert len(origin.requests("/huge")) == 1  # no retry: a cap refusal is final


def test_streaming_past_cap_refused_when_length_omitted(origin, root):
    origin.files["/liar"] = os.urandom(2_000_000)
    origin.no_length.add("/liar")
    refused(root, vols({"type": "http_file", "path": "f", "url": origin.url + "/liar"}), "volume_too_large",
            r"downloads reached \d+ bytes, over the cap of 1000000 \(max_download_bytes\)",
            limits=limits(max_download_bytes=1_000_000))


def test_caps_are_shared_across_volumes(origin, root):
    for i in range(3):
        origin.files[f"/p{i}"] = os.urandom(400_000)
    spec = [{"type": "http_file", "path": f"p{i}", "url": origin.url + f"/p{i}"} for i in range(3)]
    refused(root, vols(*spec), "volume_too_large", r"max_download_bytes", limits=limits(max_download_bytes=1_000_000))


def test_deadline(origin, root):
    origin.files["/slow"] = os.urandom(1_000_000)
    origin.slow.add("/slow")
    t0 = time.monotonic()
    refused(root, vols({"type": "http_file", "path": "f", "url": origin.url + "/slow"}), "timeout",
            r"ran past its time limit", deadline_s=0.5)
    assert time.monotonic() - t0 < 2.5


def test_cancel(origin, root):
    origin.files["/slow"] = os.urandom(1_000_000)
    origin.slow.add("/slow")
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    refused(root, vols({"type": "http_file", "path": "f", "url": origin.url + "/slow"}), "cancelled",
            "the job was cancelled", cancel=cancel)


def test_disk_failure_is_the_miners_fault(root, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("cluster.miner.volumes._Run.extract", full)
    refused(root, _inline(make_zip({"a": b"a"})), "miner_io_error", "No space left on device")


# ---------------------------------------------------------------------- hostile archives
def _inline(data: bytes) -> list:
    return vols({"type": "inline_zip", "path": "in", "contents_b64": base64.b64encode(data).decode()})


@pytest.mark.parametrize("name, match", [
    ("../../etc/passwd", r"zip entry '\.\./\.\./etc/passwd' escapes the volume"),
    ("ok/../../x", r"escapes the volume"),
    ("/etc/cron.d/evil", r"zip entry '/etc/cron.d/evil' has an absolute path"),
    ("..\\..\\win.ini", r"escapes the volume"),
])
def test_zip_path_escapes_refused(root, name, match):
    data = make_zip({"fine.txt": b"ok", name: b"evil"})
    refused(root, _inline(data), "unsafe_archive", match)


def test_zip_symlink_entry_refused(root, origin):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("fine.txt", b"ok")
        link = zipfile.ZipInfo("passwd")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    refused(root, _inline(buf.getvalue()), "unsafe_archive", r"zip entry 'passwd' is a symbolic link")
    origin.files["/link.zip"] = buf.getvalue()  # the same from a URL
    refused(root, vols({"type": "zip_url", "path": "z", "url": origin.url + "/link.zip"}), "unsafe_archive",
            "symbolic link")


def test_zip_bomb_declared_size_refused_before_writing(root):
    bomb = make_zip({"bomb.bin": b"\0" * 30_000_000})
    assert len(bomb) < 100_000
    refused(root, _inline(bomb), "volume_too_large", r"unpacked files would reach \(by declared sizes\) 30000000 bytes")


def test_zip_bomb_lying_about_its_size_refused(root):
    data = bytearray(make_zip({"a.txt": b"fine", "bomb.bin": b"\0" * 20_000_000}))
    # understate bomb.bin's uncompressed size in its local header and the central directory
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = [m.start() for m in re.finditer(re.escape(sig), data)][1]
        struct.pack_into("<I", data, pos + off, 1000)
    refused(root, _inline(bytes(data)), "unsafe_archive",
            r"zip entry 'bomb.bin' does not match its declared size or checksum")


def test_zip_with_too_many_files_refused(root):
    many = make_zip({f"f{i}.txt": b"" for i in range(50)})
    refused(root, _inline(many), "too_many_files", r"would reach \(by declared sizes\) 51 files and directories, "
            r"over the cap of 10", limits=limits(max_files=10))


def test_not_a_zip_refused(origin, root):
    origin.files["/notzip"] = b"PK not really"
    refused(root, vols({"type": "zip_url", "path": "z", "url": origin.url + "/notzip"}), "unsafe_archive",
            "not a valid zip archive")


def test_failure_of_one_volume_removes_the_others(origin, root):
    origin.files["/good.bin"] = os.urandom(10_000)
    spec = vols({"type": "http_file", "path": "good.bin", "url": origin.url + "/good.bin"},
                {"type": "inline_zip", "path": "bad",
                 "contents_b64": base64.b64encode(make_zip({"../x": b""})).decode()})
    refused(root, spec, "unsafe_archive", "escapes the volume")


def test_existing_empty_root_is_kept_empty(root):
    root.mkdir()
    with pytest.raises(VolumeError):
        prepare_volumes(_inline(make_zip({"../x": b""})), root, limits=limits())
    assert root.exists() and list(root.iterdir()) == []


# ---------------------------------------------------------------------- malformed specs
@pytest.mark.parametrize("item, match", [
    ({"type": "http_file", "path": "../x", "url": "http://h/x"}, "contains '..'"),
    ({"type": "http_file", "path": "/etc/x", "url": "http://h/x"}, "is absolute"),
    ({"type": "http_file", "path": "a\x00b", "url": "http://h/x"}, "NUL"),
    ({"type": "http_file", "path": ".", "url": "http://h/x"}, "mount point itself"),
    ({"type": "http_file", "path": "x", "url": "file:///etc/passwd"}, "http:// or https://"),
    ({"type": "zip_url", "path": "x", "url": "http:///nohost"}, "has no host"),
    ({"type": "inline_zip", "path": "x", "contents_b64": "not base64!"}, "not valid base64"),
    ({"type": "huggingface", "path": "x", "repo_id": "../etc"}, "not a Hub repository id"),
    ({"type": "huggingface", "path": "x", "repo_id": "a/b", "repo_type": "bucket"}, "repo_type"),
    ({"type": "ftp", "path": "x"}, "does not match any of the expected tags"),
    ({"type": "http_file", "path": "x", "url": "http://h/x", "sha": "1"}, "Extra inputs are not permitted"),
])
def test_malformed_volume_specs_refused(item, match):
    with pytest.raises(ValidationError, match=match):
        vols(item)


def test_normalised_paths_and_hidden_token():
    (v,) = vols({"type": "huggingface", "path": "./a//b/", "repo_id": "org/m", "token": "hf_private"})
    assert v.path == "a/b" and "hf_private" not in repr(v)
