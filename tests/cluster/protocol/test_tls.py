"""HTTPS between rayhorde's parties, on 127.0.0.1: a server whose certificate one CA signed is
trusted by a client holding that CA (as a bundle, ``$RAYHORDE_CA_BUNDLE`` or ``--ca-bundle``) and
refused, before a byte of the request is sent, by a client holding another CA, with an error
that says so and names the fix. A bundle that is not there is a configuration error naming it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import stat
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from cryptography import x509
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from cluster.cli.main import main as cli
from cluster.devstack.certs import make_ca
from cluster.errors import CapabilityRefused, CertificateUntrusted, ConfigError
from cluster.miner.serving import BackgroundServer
from cluster.protocol.http import CA_BUNDLE_ENV, ServiceClient, error_body
from tests.support.net import free_port

pytestmark = pytest.mark.integration

HEALTH = {"validator": "5HealthyValidator"}
STATUS = {"validator": "5HealthyValidator", "gcs_address": "127.0.0.1:6380", "jobs": {"completed": 3}, "miners": []}



@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca(root / "ca")
    cert, key = ca.issue(root / "server", "server", ["127.0.0.1", "localhost"])
    return SimpleNamespace(root=root, ca=ca, other=make_ca(root / "other", "someone else's CA"), cert=cert, key=key)


def _serve(cert, key, hits: list[str]) -> tuple[BackgroundServer, str]:
    async def health(request):
        hits.append(request.url.path)
        return JSONResponse(HEALTH)

    async def status(request):
        hits.append(request.url.path)
        return JSONResponse(STATUS)

    async def jobs(request):  # what validator-core answers a capability it does not know
        hits.append(request.url.path)
        return JSONResponse(error_body("invalid_capability", "no such capability; request a new one"), 403)

    app = Starlette(routes=[Route("/v1/health", health), Route("/v1/status", status),
                            Route("/v1/jobs", jobs, methods=["POST"])])
    port = free_port()
    server = BackgroundServer(app, name="a test HTTPS service", host="127.0.0.1", port=port,
                              ssl_certfile=cert, ssl_keyfile=key)
    server.start()
    return server, f"https://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def https(pki):
    hits: list[str] = []
    server, url = _serve(pki.cert, pki.key, hits)
    yield SimpleNamespace(url=url, hits=hits)
    server.stop()


@pytest.fixture(autouse=True)
def no_env_bundle(monkeypatch):
    monkeypatch.delenv(CA_BUNDLE_ENV, raising=False)  # also undoes what --ca-bundle sets in-process


def test_dev_certificates_name_their_hosts_are_short_lived_and_keep_keys_private(pki):
    cert = x509.load_pem_x509_certificate(pki.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(days=31)
    assert cert.issuer == x509.load_pem_x509_certificate(pki.ca.cert_path.read_bytes()).subject
    for key in (pki.key, pki.ca.key_path):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_client_holding_the_ca_talks_https(https, pki):
    client = ServiceClient(https.url, verify=pki.ca.cert_path)
    assert client.get("/v1/health") == HEALTH
    with pytest.raises(CapabilityRefused) as refused:  # refusals cross TLS as their own class
        client.post("/v1/jobs", {})
    assert refused.value.reason == "invalid_capability"
    client.close()


def test_a_client_holding_another_ca_is_refused_before_sending_anything(https, pki):
    before = list(https.hits)
    client = ServiceClient(https.url, verify=pki.other.cert_path)
    with pytest.raises(CertificateUntrusted) as untrusted:
        client.post("/v1/jobs", {"secret": "capability"})
    msg = str(untrusted.value)
    assert https.url in msg and "not trusted" in msg
    assert "--ca-bundle" in msg and CA_BUNDLE_ENV in msg and "ca_bundle_path" in msg
    assert https.hits == before  # the server never saw the request
    client.close()


def test_without_a_bundle_the_default_cas_do_not_trust_a_dev_ca(https):
    with pytest.raises(CertificateUntrusted):
        ServiceClient(https.url).get("/v1/health")


def test_the_bundle_comes_from_the_environment_when_not_given(https, pki, monkeypatch):
    monkeypatch.setenv(CA_BUNDLE_ENV, str(pki.ca.cert_path))
    assert ServiceClient(https.url).get("/v1/health") == HEALTH
    monkeypatch.setenv(CA_BUNDLE_ENV, str(pki.other.cert_path))
    with pytest.raises(CertificateUntrusted):
        ServiceClient(https.url).get("/v1/health")


def test_a_certificate_for_another_host_is_refused(pki):
    cert, key = pki.ca.issue(pki.root / "elsewhere", "elsewhere", ["10.77.0.2", "validator.example"])
    server, url = _serve(cert, key, [])
    try:
        with pytest.raises(CertificateUntrusted, match="not trusted"):
            ServiceClient(url, verify=pki.ca.cert_path).get("/v1/health")
    finally:
        server.stop()


def test_a_missing_or_unreadable_bundle_is_a_config_error_naming_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "ca.crt"
    with pytest.raises(ConfigError, match=str(missing)) as err:
        ServiceClient("https://127.0.0.1:1", verify=missing)
    assert "--ca-bundle" in str(err.value)
    monkeypatch.setenv(CA_BUNDLE_ENV, str(missing))
    with pytest.raises(ConfigError, match=CA_BUNDLE_ENV):
        ServiceClient("https://127.0.0.1:1")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="no readable PEM certificate"):
        ServiceClient("https://127.0.0.1:1", verify=garbage)


def test_a_server_given_half_a_pair_or_a_wrong_key_does_not_start(pki):
    with pytest.raises(ConfigError, match="both a certificate and its key"):
        BackgroundServer(Starlette(), name="half", host="127.0.0.1", port=1, ssl_certfile=pki.cert)
    with pytest.raises(ConfigError, match="key must be the certificate's"):
        BackgroundServer(Starlette(), name="mismatched", host="127.0.0.1", port=1, ssl_certfile=pki.cert,
                         ssl_keyfile=pki.ca.key_path)


def test_jobs_submit_verifies_validator_core_with_the_bundle_from_the_environment(https, pki, monkeypatch):
    import jobs

    spec = {"image": "rayhorde/busybox:local", "command": ["true"]}
    monkeypatch.setenv(CA_BUNDLE_ENV, str(pki.ca.cert_path))
    with pytest.raises(CapabilityRefused):  # TLS held: validator-core's own answer came back
        jobs.submit(spec, validator_url=https.url, capability="cap-right-ca")
    monkeypatch.setenv(CA_BUNDLE_ENV, str(pki.other.cert_path))
    with pytest.raises(CertificateUntrusted):
        jobs.submit(spec, validator_url=https.url, capability="cap-other-ca")


def test_the_cli_takes_the_bundle_from_ca_bundle(https, pki, tmp_path):
    (tmp_path / "stack.json").write_text(json.dumps({"validator_url": https.url}))
    ok = CliRunner().invoke(cli, ["status", "--home", str(tmp_path), "--ca-bundle", str(pki.ca.cert_path)])
    assert ok.exit_code == 0 and "validator 5HealthyValidator" in ok.output, ok.output
    refused = CliRunner().invoke(cli, ["status", "--home", str(tmp_path), "--ca-bundle", str(pki.other.cert_path)])
    assert refused.exit_code == 2 and "TLS certificate was not trusted" in refused.output, refused.output
    missing = CliRunner().invoke(cli, ["status", "--home", str(tmp_path), "--ca-bundle", str(tmp_path / "no.pem")])
    assert missing.exit_code == 2 and str(tmp_path / "no.pem") in missing.output, missing.output
