"""Throwaway certificates for the dev stack and tests: a CA, and server certificates it signs.

A deployment brings its own certificates (a public CA's, or its operator's); these let the
one-machine stack and the test topology serve HTTPS, and prove that a client holding another CA
refuses the connection.

    ca = make_ca(tmp / "ca")                          # ca.cert_path: the bundle clients trust
    cert, key = ca.issue(tmp / "validator", "validator", ["10.77.0.2", "localhost"])
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=30)  # dev certificates: short-lived on purpose
_BACKDATE = dt.timedelta(minutes=5)  # a host whose clock runs a little behind still accepts a fresh one


@dataclass(frozen=True)
class CA:
    cert_path: Path  # the bundle clients trust (RAYHORDE_CA_BUNDLE, --ca-bundle, ca_bundle_path)
    key_path: Path

    def issue(self, folder: str | Path, name: str, hosts: list[str], *,
              client_auth: bool = False) -> tuple[Path, Path]:
        """A server certificate for ``hosts`` (each an IP address or a DNS name), signed by this CA;
        written as ``<folder>/<name>.crt`` and ``<name>.key`` (0600). Returns (cert_path, key_path).
        ``client_auth``: also good as a client certificate (Ray's gRPC TLS is mutual: every
        process presents the same certificate to its peers)."""
        ca_cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [_san(h) for h in hosts]
        cert = (_builder(name, key, issuer=ca_cert.subject)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      *([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return _write(Path(folder), name, cert, key)


def make_ca(folder: str | Path, name: str = "rayhorde dev CA") -> CA:
    """A new self-signed CA in ``folder`` (``ca.crt``, ``ca.key`` 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(name, key, issuer=None)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return CA(*_write(Path(folder), "ca", cert, key))


def _builder(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None) -> x509.CertificateBuilder:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # created 0600, never readable by others even for a moment; chmod too in case it existed
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path
