"""The miner proxy reads no body it has not checked the signature of, and no more than its limit:
an unsigned 2 GB chunked upload and an oversized signed one are refused (401 / 413) after at most
1 MB read, with the process's memory flat. Real uvicorn on 127.0.0.1, a raw client."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from cluster.miner.proxy import JobRoute, MinerProxy
from cluster.miner.serving import BackgroundServer
from cluster.protocol.client_envelope import sign_request
from cluster.protocol.identity import Hotkey
from cluster.protocol.keys import SigningKey
from tests.support.net import CountingReads, free_port, rss_bytes, send_body

pytestmark = pytest.mark.integration

MINER = Hotkey.from_uri("//Bob")
JOB = "job-limits"


@pytest.fixture
def proxy(tmp_path):
    client = SigningKey()
    proxy = MinerProxy(MINER, volumes_dir=tmp_path, volume_max_bytes=512 * 2**10, request_max_bytes=256 * 2**10)
    proxy.add_job(JobRoute(job_id=JOB, upstream="http://127.0.0.1:9", client_keys=[client.public],
                           job_key=SigningKey().public))
    counted = CountingReads(proxy.app)
    port = free_port()
    server = BackgroundServer(counted, name="miner proxy", host="127.0.0.1", port=port)
    server.start()
    yield {"port": port, "counted": counted, "client": client, "dir": tmp_path}
    server.stop()


def headers_line(headers: dict[str, str]) -> str:
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items())


@pytest.mark.parametrize("path", [f"/jobs/{JOB}/volume/data.bin", f"/jobs/{JOB}/v1/chat/completions"])
def test_an_unsigned_2_gb_upload_is_refused_before_its_body_is_read(proxy, path):
    before = rss_bytes()
    status, sent = send_body(proxy["port"], path, 2 * 2**30, chunked=True, method="PUT" if "volume" in path
                             else "POST")
    assert status == 401 and proxy["counted"].read == 0
    assert sent < 2**30 / 4  # answered long before the 2 GB
    assert rss_bytes() - before < 64 * 2**20


def test_a_signed_body_over_the_limit_stops_at_the_limit(proxy):
    path = f"/jobs/{JOB}/volume/data.bin"
    claimed = b"y" * 10  # signed for a small body, then a huge one sent: the limit stops it first
    signed = sign_request(proxy["client"], job_id=JOB, method="PUT", path=path, body=claimed)
    status, _ = send_body(proxy["port"], path, 2**30, chunked=True, method="PUT", headers=headers_line(signed))
    assert status == 413 and proxy["counted"].read <= 10**6, proxy["counted"].read
    status, _ = send_body(proxy["port"], path, 2**30, chunked=False, method="PUT",
                          headers=headers_line(sign_request(proxy["client"], job_id=JOB, method="PUT", path=path,
                                                            body=claimed)))
    assert status == 413  # the declared length alone
    assert not (proxy["dir"] / JOB / "data.bin").exists()  # nothing half written


def test_a_signed_file_within_the_limit_lands_and_a_swapped_body_does_not(proxy):
    path = f"/jobs/{JOB}/volume/data.bin"
    body = b"z" * 300_000
    url = f"http://127.0.0.1:{proxy['port']}{path}"
    ok = httpx.put(url, content=body, headers=sign_request(proxy["client"], job_id=JOB, method="PUT", path=path,
                                                           body=body))
    assert ok.status_code == 200 and ok.json()["sha256"] == hashlib.sha256(body).hexdigest()
    swapped = httpx.put(url, content=b"w" * 10, headers=sign_request(proxy["client"], job_id=JOB, method="PUT",
                                                                     path=path, body=b"v" * 10))
    assert swapped.status_code == 403 and swapped.json()["error"]["reason"] == "body_mismatch"
    assert (proxy["dir"] / JOB / "data.bin").read_bytes() == body
