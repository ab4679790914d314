"""The echo app on Ray Serve, pinned to a miner's node of the local stack, behind the miner
proxy: the same bytes and receipts as under uvicorn, the replica on the miner's node, and a call
straight to the job's Serve route without a valid signature refused by the job itself."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from ray import serve

from cluster._private.identity import Hotkey
from cluster._private.miner.proxy import JobRoute, MinerProxy
from serve_apps import RECEIPT_HEADER, Receipt, RequestSigner, SigningKey, split_sse, verify_receipt
from serve_apps._private.keys import PublicKey
from serve_apps.echo import EchoApp
from tests.serve_apps.test_proxy import Served

pytestmark = [pytest.mark.integration, pytest.mark.slow]
JOB = "job-serve1"
PREFIX = f"/jobs/{JOB}"


def deploy_echo(miner_hotkey: str, client: SigningKey, port: int) -> str:
    """Serve's HTTP proxies on 127.0.0.1 only; the replica pinned to the miner's node."""
    serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": port,
                                                          "request_timeout_s": 30})
    dep = serve.deployment(EchoApp, name="echo", max_ongoing_requests=64, max_queued_requests=256,
                           ray_actor_options={"num_cpus": 0, "resources": {f"miner:{miner_hotkey}": 0.01}})
    serve.run(dep.bind(JOB, miner_hotkey, [client.public.model_dump()], route_prefix=PREFIX), name=JOB,
              route_prefix=PREFIX)
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def on_serve(stack):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = SigningKey()
    miner = Hotkey.from_uri("//Bob")
    serve_url = deploy_echo(miner.ss58, client, port)
    key = PublicKey.model_validate(httpx.get(f"{serve_url}{PREFIX}/-/key", timeout=30).json()["job_key"])
    proxy = MinerProxy(miner, idle_timeout_s=5)
    proxy.add_job(JobRoute(job_id=JOB, upstream=serve_url, client_keys=[client.public], job_key=key))
    front = Served(proxy.app)
    yield {"client": client, "serve_url": serve_url, "proxy": front, "key": key, "miner": miner}
    front.stop()
    serve.shutdown()


def test_replica_runs_on_the_miners_node(stack, on_serve):
    from ray.util.state import list_actors
    replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == f"ServeReplica:{JOB}:echo"]
    node = json.loads((stack.home / "miner1" / "node.json").read_text())["node_id"]
    assert [r.node_id for r in replicas] == [node]


def test_answers_through_the_proxy_carry_receipts(on_serve):
    with httpx.Client(base_url=on_serve["proxy"].url, auth=RequestSigner(on_serve["client"], JOB), timeout=30) as c:
        prev = None
        for stream in (False, True):
            body = b'{"q": "hello serve"}'
            t0 = time.time_ns()
            resp = c.post(f"{PREFIX}/echo" + ("?stream=1" if stream else ""), content=body)
            t1 = time.time_ns()
            content, receipt = (split_sse(resp.content) if stream
                                else (resp.content, Receipt.from_b64(resp.headers[RECEIPT_HEADER])))
            prev = verify_receipt(receipt, job_id=JOB, job_key=on_serve["key"], miner_hotkey=on_serve["miner"].ss58,
                                  sent_body=body, received_body=content, client_sent_ns=t0, client_received_ns=t1,
                                  prev=prev)


def test_a_direct_call_to_the_serve_route_without_a_valid_signature_is_refused_by_the_job(on_serve):
    direct = f"{on_serve['serve_url']}{PREFIX}/echo"
    r = httpx.post(direct, content=b"{}", timeout=30)
    assert r.status_code == 401 and r.json()["reason"] == "unsigned"
    with httpx.Client(auth=RequestSigner(SigningKey(), JOB), timeout=30) as stranger:
        r = stranger.post(direct, content=b"{}")
    assert r.status_code == 403 and r.json()["reason"] == "unknown_client_key"
