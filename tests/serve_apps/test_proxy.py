"""The echo app behind the miner proxy, over real HTTP (uvicorn on 127.0.0.1): signed requests,
receipts in a header and as an SSE trailer, refusals at the proxy and at the job itself, a
tampered answer caught by the client, and a stalled stream ended by the proxy's idle timeout.
(Issue 4's pieces that do not need Ray Serve yet; on Serve the app runs unchanged.)"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from cluster.errors import Refused, RequestRefused, SignatureRejected
from cluster.protocol.http import raise_for_error
from cluster.protocol.identity import Hotkey
from cluster.miner.proxy import JobRoute, MinerProxy
from serve_apps import (
    RECEIPT_HEADER, Receipt, ReceiptInvalid, RequestSigner, SigningKey, sign_request, split_sse, verify_receipt,
)
from cluster.protocol.keys import PublicKey
from serve_apps.echo import EchoApp
from tests.serve_apps.conftest import assert_error
from tests.support.net import free_port, wait_for

pytestmark = pytest.mark.integration

MINER = Hotkey.from_uri("//Bob")
JOB = "job-e1"
PREFIX = f"/jobs/{JOB}"



class Served:
    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


def echo_asgi(echo: EchoApp) -> Starlette:
    async def endpoint(request):
        return await echo(request)
    return Starlette(routes=[Route(PREFIX + "/{rest:path}", endpoint, methods=["GET", "POST"])])


@pytest.fixture
def world():
    client = SigningKey()
    echo = EchoApp(JOB, MINER.ss58, [client.public.model_dump()], route_prefix=PREFIX)
    job = Served(echo_asgi(echo))
    key = PublicKey.model_validate(httpx.get(f"{job.url}{PREFIX}/-/key").json()["job_key"])
    proxy = MinerProxy(MINER, idle_timeout_s=1.5)
    proxy.add_job(JobRoute(job_id=JOB, upstream=job.url, client_keys=[client.public], job_key=key))
    front = Served(proxy.app)
    yield {"client": client, "job": job, "proxy": front, "job_key": key, "echo": echo}
    front.stop()
    job.stop()


def signed(world) -> httpx.Client:
    return httpx.Client(base_url=world["proxy"].url, auth=RequestSigner(world["client"], JOB), timeout=10)


def test_buffered_and_streamed_answers_carry_receipts_that_verify_and_chain(world):
    prev = None
    with signed(world) as c:
        for i, stream in enumerate([False, True, False]):
            body = f'{{"i": {i}, "pad": "{"x" * 100}"}}'.encode()
            t0 = time.time_ns()
            resp = c.post(f"{PREFIX}/echo" + ("?stream=1" if stream else ""), content=body)
            t1 = time.time_ns()
            assert resp.status_code == 200, resp.text
            if stream:
                content, receipt = split_sse(resp.content)
                assert content.count(b"data: ") == -(-len(body) // 64) + 1 and content.endswith(b"data: [DONE]\n\n")
            else:
                content, receipt = resp.content, Receipt.from_b64(resp.headers[RECEIPT_HEADER])
            b = verify_receipt(receipt, job_id=JOB, job_key=world["job_key"], miner_hotkey=MINER.ss58,
                               sent_body=body, received_body=content, client_sent_ns=t0, client_received_ns=t1,
                               prev=prev)
            assert b.seq == i
            prev = b
            kept = httpx.get(f"{world['proxy'].url}{PREFIX}/receipts/{b.request_id}").json()
            assert Receipt.model_validate(kept) == receipt  # also served by request id


def test_the_proxy_refuses_bad_requests_with_reasons(world):
    url = f"{world['proxy'].url}{PREFIX}/echo"
    assert httpx.post(url, content=b"{}").json()["error"]["reason"] == "unsigned"
    with httpx.Client(auth=RequestSigner(SigningKey(), JOB)) as stranger:
        assert stranger.post(url, content=b"{}").json()["error"]["reason"] == "unknown_client_key"
    headers = sign_request(world["client"], job_id=JOB, method="POST", path=f"{PREFIX}/echo", body=b"{}")
    assert httpx.post(url, content=b"{}", headers=headers).status_code == 200
    again = httpx.post(url, content=b"{}", headers=headers).json()["error"]
    assert again["reason"] == "replayed"  # refused at the proxy, before it costs the job anything


def test_a_call_straight_to_the_job_without_a_valid_signature_is_refused_by_the_job(world):
    direct = f"{world['job'].url}{PREFIX}/echo"
    r = httpx.post(direct, content=b"{}")
    assert r.status_code == 401 and r.json()["error"]["reason"] == "unsigned"
    with httpx.Client(auth=RequestSigner(SigningKey(), JOB)) as stranger:
        assert stranger.post(direct, content=b"{}").json()["error"]["reason"] == "unknown_client_key"


def test_proxy_and_app_refusals_are_the_one_error_shape_and_map_back_to_their_class(world):
    for base in (world["proxy"].url, world["job"].url):  # the miner's door, then the job's own
        unsigned = httpx.post(f"{base}{PREFIX}/echo", content=b"{}")
        assert_error(unsigned, 401, "unsigned")
        with pytest.raises(SignatureRejected):
            raise_for_error(unsigned)
        with httpx.Client(auth=RequestSigner(SigningKey(), JOB)) as stranger:
            foreign = stranger.post(f"{base}{PREFIX}/echo", content=b"{}")
        assert_error(foreign, 403, "unknown_client_key")
        with pytest.raises(RequestRefused) as err:
            raise_for_error(foreign)
        assert err.value.status_code == 403 and "not registered for this job" in err.value.message
    assert_error(httpx.get(f"{world['job'].url}{PREFIX}/nowhere"), 404, "not_found")
    assert_error(httpx.get(f"{world['proxy'].url}/jobs/job-unknown/receipts/r1"), 404, "not_found")
    with signed(world) as c:  # the app's own errors after a valid envelope: same shape, no receipt
        bad = c.post(f"{PREFIX}/volume", content=b"not json")
        assert_error(bad, 400, "malformed")
        missing = c.post(f"{PREFIX}/volume", content=b'{"name": "absent.txt"}')
        assert "absent.txt" in assert_error(missing, 404, "no_such_file")["message"]
        assert RECEIPT_HEADER not in missing.headers
        with pytest.raises(Refused):
            raise_for_error(missing)


def test_a_byte_changed_between_job_and_client_fails_verification(world):
    with signed(world) as c:
        resp = c.post(f"{PREFIX}/echo", content=b'{"a": 1}')
    tampered = bytearray(resp.content)
    tampered[3] ^= 0x01
    with pytest.raises(ReceiptInvalid) as err:
        verify_receipt(Receipt.from_b64(resp.headers[RECEIPT_HEADER]), job_id=JOB, job_key=world["job_key"],
                       miner_hotkey=MINER.ss58, sent_body=b'{"a": 1}', received_body=bytes(tampered))
    assert err.value.check == "output_sha256"


def test_a_stalled_stream_ends_with_an_error_within_the_idle_timeout(world):
    world["echo"].chunk_delay_s = 5  # the job goes silent after its first event
    t0 = time.monotonic()
    with signed(world) as c:
        resp = c.post(f"{PREFIX}/echo?stream=1", content=b"y" * 200)
    took = time.monotonic() - t0
    assert b"idle timeout" in resp.content and b": receipt " not in resp.content
    assert took < 3 * 1.5, f"the stream took {took:.1f} s to end with a 1.5 s idle timeout"


def slow_echo_asgi(echo: EchoApp, delay_s: float) -> Starlette:
    """The echo app with ``delay_s`` before each streamed chunk: a client that leaves at
    ``data: [DONE]`` is gone before the job's receipt event comes."""
    async def endpoint(request):
        resp = await echo(request)
        if isinstance(resp, StreamingResponse):
            inner = resp.body_iterator

            async def slow():
                async for chunk in inner:
                    await asyncio.sleep(delay_s)
                    yield chunk
            resp.body_iterator = slow()
        return resp
    return Starlette(routes=[Route(PREFIX + "/{rest:path}", endpoint, methods=["GET", "POST"])])


def test_clients_that_leave_early_still_leave_every_receipt_kept(tmp_path):
    """10 clients close at ``data: [DONE]`` (as the openai client does), 5 after the first event:
    the proxy reads each answer to its end, so every answer's receipt is kept, seqs without a gap."""
    client = SigningKey()
    echo = EchoApp(JOB, MINER.ss58, [client.public.model_dump()], route_prefix=PREFIX)
    job = Served(slow_echo_asgi(echo, 0.05))
    key = PublicKey.model_validate(httpx.get(f"{job.url}{PREFIX}/-/key").json()["job_key"])
    proxy = MinerProxy(MINER, idle_timeout_s=5)
    proxy.add_job(JobRoute(job_id=JOB, upstream=job.url, client_keys=[client.public], job_key=key))
    front = Served(proxy.app)
    try:
        with httpx.Client(base_url=front.url, auth=RequestSigner(client, JOB), timeout=10) as c:
            for i in range(15):
                leave_at = b"data: [DONE]" if i < 10 else b"data: "
                with c.stream("POST", f"{PREFIX}/echo?stream=1", content=b'{"pad": "%s"}' % (b"x" * 200)) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if line.encode().startswith(leave_at):
                            break  # the client goes; the job has not sent its receipt yet
        wait_for(lambda: proxy.book.count(JOB) == 15, 10, "every answer's receipt kept")
        seqs = [k["receipt"]["body"]["seq"] for k in proxy.book.page(JOB, after_seq=-1, limit=100)]
        assert seqs == list(range(15))  # no chain gap
    finally:
        front.stop()
        job.stop()
