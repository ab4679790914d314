"""The miner proxy over HTTPS: the agent's StreamKeeper serves it with a certificate, announces
it, and every client of it (the user's streaming client and the ``openai`` client on it,
validator-core's collector and probes) reaches the job through it when holding the CA, and is
refused, with an error naming the fix, when holding another CA. The job (the echo app, standing
in for the node's Serve proxy) stays plain HTTP on loopback, as on a miner host."""

from __future__ import annotations

import json
import logging
import socket
import time
from types import SimpleNamespace

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.routing import Route

from cluster.devstack.certs import make_ca
from cluster.errors import CertificateUntrusted, ConfigError, Refused
from cluster.miner.serving import BackgroundServer
from cluster.miner.streams import StreamKeeper
from cluster.protocol.http import CA_BUNDLE_ENV, ServiceClient
from cluster.protocol.identity import Hotkey
from cluster.protocol.jobs import JobStatus
from cluster.protocol.streams import StreamAssignment, StreamSpec, StreamView
from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.probes import ProbeDesk
from cluster.validator.verification import VerificationDesk
from serve_apps import SigningKey, StreamJob, Streams
from serve_apps.echo import EchoApp
from tests.support.net import free_port

pytestmark = pytest.mark.integration

MINER = Hotkey.from_uri("//Bob")
VALIDATOR = Hotkey.from_uri("//Alice")
JOB = "job-tls1"
PREFIX = f"/jobs/{JOB}"



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy-tls")
    ca, other = make_ca(root / "ca"), make_ca(root / "other", "someone else's CA")
    cert, key = ca.issue(root / "miner", "miner1", ["127.0.0.1"])
    client = SigningKey()
    echo = EchoApp(JOB, MINER.ss58, [client.public.model_dump()], route_prefix=PREFIX)

    async def endpoint(request):
        return await echo(request)

    serve_port = free_port()
    serve = BackgroundServer(Starlette(routes=[Route(PREFIX + "/{rest:path}", endpoint, methods=["GET", "POST"])]),
                             name="the echo job", host="127.0.0.1", port=serve_port)
    serve.start()
    posted: list[dict] = []

    def validator_core(request: httpx.Request) -> httpx.Response:  # takes the signed readiness
        posted.append({"path": request.url.path, "envelope": json.loads(request.content)})
        return httpx.Response(200, json={"ok": True})

    port = free_port()
    proxy_url = f"https://127.0.0.1:{port}"
    validator = ServiceClient("https://validator.invalid", transport=httpx.MockTransport(validator_core))
    keeper = StreamKeeper(MINER, validator,
                          validator_hotkey=VALIDATOR.ss58, proxy_port=port, proxy_url=proxy_url,
                          serve_url=f"http://127.0.0.1:{serve_port}", volumes_dir=root / "volumes",
                          idle_timeout_s=5, max_skew_s=5, volume_max_bytes=2**20, ready_timeout_s=20,
                          proxy_host="127.0.0.1", tls_cert_path=cert, tls_key_path=key)
    keeper.start()
    keeper.update([StreamAssignment(job_id=JOB, route_prefix=PREFIX, client_keys=[client.public],
                                    deadline_ns=time.time_ns() + 600 * 10**9).model_dump(mode="json")])
    deadline = time.monotonic() + 20
    while not posted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert posted and posted[0]["path"] == f"/v1/streams/{JOB}/ready", "the keeper never announced the job"
    yield SimpleNamespace(ca=ca, other=other, client=client, proxy_url=proxy_url, readiness=posted[0]["envelope"],
                          root=root)
    keeper.stop()
    serve.stop()


@pytest.fixture(autouse=True)
def no_env_bundle(monkeypatch):
    monkeypatch.delenv(CA_BUNDLE_ENV, raising=False)


def _job(world, **streams_kw) -> StreamJob:
    """The user's view of the job, as validator-core would hand it over (no validator-core here)."""
    streams = Streams("https://validator.invalid", "capability", **streams_kw)
    view = StreamView(job_id=JOB, status=JobStatus.streaming_ready, app="echo", version="1",
                      executor_class="always_on.test", miner_hotkey=MINER.ss58, route_prefix=PREFIX,
                      created_ns=time.time_ns(), readiness=world.readiness)
    job = StreamJob(streams, view)
    job.wait_ready()
    return job


def test_the_proxy_announces_https_and_a_client_holding_the_ca_gets_verified_answers(world, monkeypatch):
    job = _job(world, ca_bundle=world.ca.cert_path)
    assert job.base_url == f"{world.proxy_url}{PREFIX}"
    for stream in ("", "?stream=1"):
        answer = job.call(world.client, "/echo" + stream, b'{"over": "tls"}')
        assert answer.status_code == 200 and b"tls" in answer.content and answer.receipt is not None
    monkeypatch.setenv(CA_BUNDLE_ENV, str(world.ca.cert_path))  # the default bundle: the environment's
    assert _job(world).call(world.client, "/echo", b"{}").receipt is not None


def test_a_client_holding_another_ca_or_the_default_cas_is_refused_by_name(world, monkeypatch):
    for job in (_job(world, ca_bundle=world.other.cert_path), _job(world)):
        with pytest.raises(CertificateUntrusted) as err:
            job.call(world.client, "/echo", b"{}")
        assert world.proxy_url in str(err.value) and CA_BUNDLE_ENV in str(err.value)
    with pytest.raises(CertificateUntrusted):
        _job(world, ca_bundle=world.other.cert_path).put_file(world.client, "a.txt", b"x")


def test_the_openai_client_on_the_job_honours_the_bundle(world):
    import openai

    right = _job(world, ca_bundle=world.ca.cert_path).openai(world.client)
    with pytest.raises(openai.NotFoundError):  # through TLS to the echo job, which has no /v1 routes
        right.models.list()
    wrong = _job(world, ca_bundle=world.other.cert_path).openai(world.client)
    with pytest.raises(CertificateUntrusted, match="not trusted"):  # not openai's bare "Connection error."
        wrong.models.list()


def _validator(world, tmp_path, ca_bundle):
    tmp_path.mkdir()
    settings = ValidatorSettings(home=tmp_path, ca_bundle_path=ca_bundle)
    engine = db.open_engine(f"sqlite:///{tmp_path / 'v.db'}")
    spec = StreamSpec(app="echo", version="1", client_keys=[world.client.public])
    with engine.begin() as conn:
        conn.execute(db.streams.insert().values(
            id=JOB, capability_id="cap", user_hotkey="user", spec=spec.model_dump(mode="json"),
            executor_class="always_on.test", status=JobStatus.streaming_ready.value, created_ns=0,
            miner_hotkey=MINER.ss58, ready_envelope=json.dumps(world.readiness), receipts_seq=-1))
    return settings, engine


def test_validator_core_collects_and_probes_over_https_with_its_ca_bundle(world, tmp_path, caplog):
    _job(world, ca_bundle=world.ca.cert_path).call(world.client, "/echo", b'{"to": "collect"}')
    settings, engine = _validator(world, tmp_path / "right", world.ca.cert_path)
    desk = VerificationDesk(settings, hotkey=VALIDATOR, engine=engine, ledger=None, scoring=None, clock=time.time_ns)
    assert desk.collect() >= 1  # the answers' receipts came over TLS, every signature checked
    probes = ProbeDesk(settings, engine=engine, clock=time.time_ns)
    [row] = engine.connect().execute(sa.select(db.streams)).all()
    probes.send(row)  # the echo job refuses the probe key (it is no verifiable app): an HTTP answer
    with engine.connect() as conn:
        [reached] = conn.execute(sa.select(db.probes.c.error)).scalars().all()
    assert "403" in reached and "trusted" not in reached

    settings, engine = _validator(world, tmp_path / "wrong", world.other.cert_path)
    desk = VerificationDesk(settings, hotkey=VALIDATOR, engine=engine, ledger=None, scoring=None, clock=time.time_ns)
    with caplog.at_level(logging.WARNING):
        assert desk.collect() == 0
    assert "TLS certificate was not trusted" in caplog.text and "ca_bundle_path" in caplog.text
    ProbeDesk(settings, engine=engine, clock=time.time_ns).send(row)
    with engine.connect() as conn:
        [refused] = conn.execute(sa.select(db.probes.c.error)).scalars().all()
    assert "TLS certificate was not trusted" in refused

    with pytest.raises(ConfigError, match="nowhere.pem"):
        ProbeDesk(ValidatorSettings(home=tmp_path, ca_bundle_path=tmp_path / "nowhere.pem"), engine=engine,
                  clock=time.time_ns)


def test_the_proxy_binds_the_host_it_is_given(world):
    cert, key = world.ca.issue(world.root / "miner2", "miner2", ["127.0.0.2"])
    port = free_port()
    keeper = StreamKeeper(MINER, ServiceClient("https://validator.invalid", transport=httpx.MockTransport(
                              lambda r: httpx.Response(200, json={}))),
                          validator_hotkey=VALIDATOR.ss58, proxy_port=port, proxy_url=f"https://127.0.0.2:{port}",
                          serve_url="http://127.0.0.1:1", volumes_dir=world.root / "volumes2", idle_timeout_s=5,
                          max_skew_s=5, volume_max_bytes=2**20, proxy_host="127.0.0.2", tls_cert_path=cert,
                          tls_key_path=key)
    keeper.start()
    try:
        with pytest.raises(Refused) as err:  # the proxy's own answer, over TLS, at 127.0.0.2
            ServiceClient(f"https://127.0.0.2:{port}", verify=world.ca.cert_path).get(f"/jobs/{JOB}/receipts")
        assert err.value.reason == "unsigned"  # receipts are the validator's alone
        with socket.socket() as s:  # 127.0.0.1 is loopback too, but not the address asked for
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        keeper.stop()
