"""Input volumes and uploads through whole jobs, and the /output size cap: real local servers, real presigned S3 URLs (moto), bytes checked end to end."""

from __future__ import annotations

import base64
import hashlib
import os
import time

import pytest

from tests.cluster.miner.test_uploads import BUCKET, put_url, read_back, s3  # noqa: F401 (fixture)
from tests.cluster.miner.test_volumes import SHA, HubRepo, make_zip
from tests.conftest import IMAGE, container_events

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_every_volume_type_in_and_every_upload_type_out(stack, hub, s3, tmp_path):  # noqa: F811
    inline = {"a.txt": b"inline\n"}
    blob = os.urandom(200_000)
    hub.files["/files/blob.bin"] = blob
    hub.files["/files/in.zip"] = make_zip({"x/1.txt": b"zipped\n"})
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    (repo_dir / "config.json").write_text('{"h": 1}')
    hub.hub[("model", "acme/e2e")] = HubRepo(dir=repo_dir)
    post = s3.generate_presigned_post(BUCKET, "e2e/log.txt", ExpiresIn=300)
    spec = {
        "image": IMAGE,
        "command": ["sh", "-c", "cat /volume/in/a.txt /volume/z/x/1.txt /volume/hf/config.json; echo; "
                                "sha256sum /volume/h/blob.bin; touch /volume/in/new 2>/dev/null || echo volume-ro; "
                                "mkdir -p /output/res && cp /volume/h/blob.bin /output/res/out.bin && "
                                "echo done > /output/log.txt"],
        "volumes": [
            {"type": "inline_zip", "path": "in", "contents_b64": base64.b64encode(make_zip(inline)).decode()},
            {"type": "http_file", "path": "h/blob.bin", "url": f"{hub.url}/files/blob.bin"},
            {"type": "zip_url", "path": "z", "url": f"{hub.url}/files/in.zip"},
            {"type": "huggingface", "path": "hf", "repo_id": "acme/e2e", "revision": SHA},
        ],
        "uploads": [
            {"type": "put", "path": "res/out.bin", "url": put_url(s3, "e2e/out.bin")},
            {"type": "post", "path": "log.txt", "url": post["url"], "form_fields": post["fields"]},
            {"type": "zip", "url": put_url(s3, "e2e/all.zip")},
        ],
    }
    view = stack.run(spec)
    assert view.status.value == "completed", view.failure
    assert view.result.stdout.splitlines() == ["inline", "zipped", '{"h": 1}', f"{sha(blob)}  /volume/h/blob.bin",
                                               "volume-ro"]
    assert "volumes_ready" in [e.status.value for e in view.history]
    assert read_back(s3, "e2e/out.bin") == blob
    assert read_back(s3, "e2e/log.txt") == b"done\n"
    assert [u.path for u in view.result.uploads] == ["res/out.bin", "log.txt", "*"]
    assert all(200 <= u.status_code < 300 for u in view.result.uploads)
    import io
    import zipfile
    with zipfile.ZipFile(io.BytesIO(read_back(s3, "e2e/all.zip"))) as zf:
        assert zf.read("res/out.bin") == blob and zf.read("log.txt") == b"done\n"


def test_writing_past_the_output_cap_fails_while_running(stack, s3):  # noqa: F811
    # always_on.test gives /output 16 MB; the job tries 32 MB and the write itself fails
    view = stack.run({"image": IMAGE, "command": ["sh", "-c", "dd if=/dev/zero of=/output/big bs=1M count=32; "
                                                              "echo dd_exit=$?; exit 7"],
                      "uploads": [{"type": "put", "path": "big", "url": put_url(s3, "never")}]})
    assert view.status.value == "failed"
    assert (view.failure.reason, view.failure.stage, view.failure.exit_code) == ("nonzero_return_code", "execution", 7)
    assert "dd_exit=1" in view.result.stdout and "No space left on device" in view.result.stderr
    assert view.result.uploads == []
    with pytest.raises(Exception):
        read_back(s3, "never")


@pytest.mark.parametrize("entries, reason, match", [
    ({"../escape.txt": b"x"}, "unsafe_archive", "escapes the volume"),
    ({"/etc/passwd": b"x"}, "unsafe_archive", "absolute"),
])
def test_hostile_archive_fails_at_download_and_nothing_runs(stack, engine, entries, reason, match):
    since = time.time()
    bad = base64.b64encode(make_zip(entries)).decode()
    view = stack.run({"image": IMAGE, "command": ["true"],
                      "volumes": [{"type": "inline_zip", "path": "in", "contents_b64": bad}]})
    assert view.status.value == "failed"
    assert (view.failure.reason, view.failure.stage) == (reason, "download")
    assert match in view.failure.message
    assert container_events(engine, since, **{"rayhorde.job": view.job_id}) == []
    leftovers = [p for name in stack.miners for p in (stack.home / name / "jobs").glob("*")]
    assert leftovers == []


def test_volume_over_the_size_cap_is_refused(stack, hub):
    hub.files["/files/huge.bin"] = b"\0" * (65 * 2**20)  # always_on.test caps downloads at 64 MiB
    view = stack.run({"image": IMAGE, "command": ["true"],
                      "volumes": [{"type": "http_file", "path": "huge.bin", "url": f"{hub.url}/files/huge.bin"}]})
    assert view.status.value == "failed"
    assert (view.failure.reason, view.failure.stage) == ("volume_too_large", "download")
