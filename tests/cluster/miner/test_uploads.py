"""The upload stage against a real S3-compatible server (moto in server mode on 127.0.0.1) issuing
real presigned PUT and POST URLs; every upload is read back with boto3 and compared byte for
byte. A small forwarding proxy in front of moto fails the first requests with 503 to prove
retries, and records how each request was framed.
"""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer
from pydantic import TypeAdapter, ValidationError

from cluster.errors import UploadError
from cluster.miner.uploads import upload_outputs
from cluster.protocol.job_io import Upload

pytestmark = pytest.mark.integration

UPLOADS = TypeAdapter(list[Upload])
BUCKET = "outputs"
FAST = dict(retries=3, backoff_s=0.01, timeout_s=10, allow_private_networks=True)


def ups(*items: dict) -> list:
    return UPLOADS.validate_python(list(items))


def s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


@pytest.fixture(scope="module")
def s3():
    # one in-thread server for the module: its werkzeug loop polls every 0.5 s, so stopping it
    # costs half a second; keys are unique per test, so tests cannot see each other's objects
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = s3_client(f"http://{host}:{port}")
    client.create_bucket(Bucket=BUCKET)
    client.endpoint = f"http://{host}:{port}"
    yield client
    server.stop()


class Proxy:
    """Forwards to ``target``; answers 503 to the first ``fail_first`` requests; records framing."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.fail_first = 0
        self.big_body = False
        self.delay_s = 0.0
        self.seen: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in h.headers.items()}
        body = h.rfile.read(int(headers.get("content-length", "0")))
        time.sleep(self.delay_s)
        with self.lock:
            self.seen.append(headers)
            failing = self.fail_first > 0
            self.fail_first -= failing
        if failing:
            return self._answer(h, 503, {}, b"<Error><Code>SlowDown</Code></Error>")
        if self.big_body:
            return self._answer(h, 200, {"ETag": '"big"'}, b"B" * 100_000)
        fwd = {k: v for k, v in h.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
        resp = httpx.request(h.command, self.target + h.path, headers=fwd, content=body)
        self._answer(h, resp.status_code, {k: v for k, v in resp.headers.items()
                                           if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                                                "content-encoding")}, resp.content)

    @staticmethod
    def _answer(h, code: int, headers: dict[str, str], body: bytes) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:  # noqa: N802
        self.server.proxy.handle(self)

    do_POST = do_PUT

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (deadline test) is not a test failure


@pytest.fixture
def proxy(s3):
    server = _Server(("127.0.0.1", 0), _Handler)
    server.proxy = Proxy(s3.endpoint)
    server.proxy.client = s3_client(f"http://127.0.0.1:{server.server_address[1]}")  # signs for the proxy's host
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.proxy
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def output(tmp_path) -> Path:
    out = tmp_path / "output"
    (out / "res" / "deep").mkdir(parents=True)
    (out / "empty").mkdir()
    (out / "res" / "out.bin").write_bytes(os.urandom(200_000))
    (out / "res" / "deep" / "log.txt").write_text("done\n")
    (out / "top.json").write_text('{"ok": true}')
    return out


def put_url(client, key: str) -> str:
    return client.generate_presigned_url("put_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=300)


def read_back(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


# ---------------------------------------------------------------------- each type, bytes checked
def test_put_presigned(s3, output):
    (resp,) = upload_outputs(ups({"type": "put", "path": "res/out.bin", "url": put_url(s3, "a/out.bin")}), output,
                             **FAST)
    assert read_back(s3, "a/out.bin") == (output / "res/out.bin").read_bytes()
    assert resp.path == "res/out.bin" and resp.status_code == 200 and resp.bytes_sent == 200_000
    assert resp.headers["etag"].strip('"') == s3.head_object(Bucket=BUCKET, Key="a/out.bin")["ETag"].strip('"')


def test_post_presigned(s3, output):
    post = s3.generate_presigned_post(BUCKET, "b/log.txt", ExpiresIn=300)
    (resp,) = upload_outputs(ups({"type": "post", "path": "res/deep/log.txt", "url": post["url"],
                                  "form_fields": post["fields"]}), output, **FAST)
    assert 200 <= resp.status_code < 300
    assert read_back(s3, "b/log.txt") == b"done\n"


def _zip_contents(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_zip_of_whole_output(s3, output, tmp_path, method):
    key = f"all-{method}.zip"
    secret = tmp_path / "miner-secret"
    secret.write_text("hotkey seed")
    (output / "leak").symlink_to(secret)  # a job planting links must not exfiltrate the miner's files
    (output / "linkdir").symlink_to(tmp_path)
    os.mkfifo(output / "fifo")  # nor hang the uploader
    if method == "PUT":
        spec = {"type": "zip", "url": put_url(s3, key)}
    else:
        post = s3.generate_presigned_post(BUCKET, key, ExpiresIn=300)
        spec = {"type": "zip", "method": "POST", "url": post["url"], "form_fields": post["fields"]}
    (resp,) = upload_outputs(ups(spec), output, **FAST)
    assert resp.path == "*" and 200 <= resp.status_code < 300
    got = _zip_contents(read_back(s3, key))
    assert got == {"empty/": b"", "res/deep/log.txt": b"done\n", "res/out.bin": (output / "res/out.bin").read_bytes(),
                   "top.json": b'{"ok": true}'}
    assert not any(b"hotkey seed" in v for v in got.values())


def test_several_uploads_keep_their_order(s3, output):
    spec = [{"type": "put", "path": p, "url": put_url(s3, f"k{i}")} for i, p in
            enumerate(["top.json", "res/out.bin", "res/deep/log.txt"])] + [{"type": "zip", "url": put_url(s3, "z")}]
    out = upload_outputs(ups(*spec), output, max_parallel=2, **FAST)
    assert [r.path for r in out] == ["top.json", "res/out.bin", "res/deep/log.txt", "*"]
    for i, p in enumerate(["top.json", "res/out.bin", "res/deep/log.txt"]):
        assert read_back(s3, f"k{i}") == (output / p).read_bytes()


# ---------------------------------------------------------------------- retries and failures
def test_retry_after_5xx(s3, proxy, output):
    proxy.fail_first = 2
    upload_outputs(ups({"type": "put", "path": "res/out.bin", "url": put_url(proxy.client, "r.bin")}), output, **FAST)
    assert read_back(s3, "r.bin") == (output / "res/out.bin").read_bytes()
    assert len(proxy.seen) == 3
    # presigned S3 PUTs refuse chunked bodies: every try carried a Content-Length
    assert all(h.get("content-length") == "200000" and "transfer-encoding" not in h for h in proxy.seen)


def test_post_retry_after_5xx(s3, proxy, output):
    proxy.fail_first = 1
    post = proxy.client.generate_presigned_post(BUCKET, "p.json", ExpiresIn=300)
    upload_outputs(ups({"type": "post", "path": "top.json", "url": post["url"], "form_fields": post["fields"]}),
                   output, **FAST)
    assert read_back(s3, "p.json") == b'{"ok": true}' and len(proxy.seen) == 2


def test_gives_up_after_retries(proxy, output):
    proxy.fail_first = 99
    with pytest.raises(UploadError) as info:
        upload_outputs(ups({"type": "put", "path": "top.json", "url": put_url(proxy.client, "x")}), output,
                       **{**FAST, "retries": 1})
    assert info.value.reason == "upload_failed"
    assert "failed after 2 tries (HTTP 503" in info.value.message and "X-Amz-Signature" not in info.value.message
    assert len(proxy.seen) == 2


def test_client_error_fails_at_once_with_the_targets_reason(s3, output):
    url = s3.generate_presigned_url("put_object", Params={"Bucket": "no-such-bucket", "Key": "k"}, ExpiresIn=300)
    with pytest.raises(UploadError) as info:
        upload_outputs(ups({"type": "put", "path": "top.json", "url": url}), output, **FAST)
    assert info.value.status_code == 404 and "NoSuchBucket" in info.value.message


def test_response_body_is_capped(proxy, output):
    proxy.big_body = True
    (resp,) = upload_outputs(ups({"type": "put", "path": "top.json", "url": put_url(proxy.client, "x")}), output,
                             body_cap_bytes=1000, **FAST)
    assert resp.body == "B" * 1000 and resp.body_truncated and resp.headers["etag"] == '"big"'


@pytest.mark.parametrize("make, path, match", [
    (lambda out, tmp: (out / "leak").symlink_to(tmp / "secret"), "leak", "symbolic link"),
    (lambda out, tmp: (out / "ldir").symlink_to(tmp), "ldir/secret", "symbolic link"),
    (lambda out, tmp: os.mkfifo(out / "pipe"), "pipe", "not a regular file"),
    (lambda out, tmp: None, "missing.bin", "does not exist; the job must write /output/missing.bin"),
    (lambda out, tmp: None, "res", "not a regular file"),
])
def test_unsafe_or_missing_outputs_refused_before_sending(proxy, output, tmp_path, make, path, match):
    (tmp_path / "secret").write_text("hotkey seed")
    make(output, tmp_path)
    spec = ups({"type": "put", "path": "top.json", "url": put_url(proxy.client, "ok")},
               {"type": "put", "path": path, "url": put_url(proxy.client, "bad")})
    with pytest.raises(UploadError, match=match) as info:
        upload_outputs(spec, output, **FAST)
    assert info.value.reason == "upload_failed"
    assert proxy.seen == []  # every file is checked before anything is sent


def test_private_addresses_refused_by_default(proxy, output):
    with pytest.raises(UploadError, match=r"resolves to 127\.0\.0\.1, which is not a public address"):
        upload_outputs(ups({"type": "put", "path": "top.json", "url": put_url(proxy.client, "x")}), output,
                       **{**FAST, "allow_private_networks": False})
    assert proxy.seen == []


def test_deadline(proxy, output):
    proxy.delay_s = 2.0
    t0 = time.monotonic()
    with pytest.raises(UploadError) as info:
        upload_outputs(ups({"type": "put", "path": "top.json", "url": put_url(proxy.client, "x")}), output,
                       deadline_s=0.3, **FAST)
    assert info.value.reason == "timeout" and "ran past the upload stage's time limit" in info.value.message
    assert time.monotonic() - t0 < 1.5


def test_superseded_attempt_uploads_nothing(proxy, output):
    with pytest.raises(UploadError) as info:
        upload_outputs(ups({"type": "put", "path": "top.json", "url": put_url(proxy.client, "x")}), output,
                       still_current=lambda: False, **FAST)
    assert info.value.reason == "superseded" and proxy.seen == []


# ---------------------------------------------------------------------- malformed specs
@pytest.mark.parametrize("item, match", [
    ({"type": "put", "path": "../etc/passwd", "url": "http://h/x"}, "contains '..'"),
    ({"type": "put", "path": "/abs", "url": "http://h/x"}, "is absolute"),
    ({"type": "put", "path": "a", "url": "s3://bucket/key"}, "http:// or https://"),
    ({"type": "put", "path": "a", "url": "http://h/x", "headers": {"X-A": "v\r\nInjected: 1"}}, "CR, LF"),
    ({"type": "put", "path": "a", "url": "http://h/x", "headers": {"Content-Length": "1"}}, "set by the uploader"),
    ({"type": "post", "path": "a", "url": "http://h/x", "headers": {"Content-Type": "text/plain"}}, "multipart"),
    ({"type": "post", "path": "a", "url": "http://h/x", "form_fields": {"file": "x"}}, "reserved"),
    ({"type": "zip", "url": "http://h/x", "method": "DELETE"}, "method"),
    ({"type": "zip", "url": "http://h/x", "method": "POST", "headers": {"content-type": "a"}}, "multipart"),
    ({"type": "put", "path": "a", "url": "http://h/x", "verb": "PATCH"}, "Extra inputs are not permitted"),
])
def test_malformed_upload_specs_refused(item, match):
    with pytest.raises(ValidationError, match=match):
        ups(item)
