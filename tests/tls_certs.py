"""Throwaway TLS material for tests and benchmarks: a CA of our own and certificates it signs.

``make_pki(folder)`` writes a fresh CA, a server certificate for ``localhost``,
``127.0.0.1`` and ``::1`` and a client certificate (for servers that want mutual TLS,
as Redis does by default), each as PEM files, and a second, unrelated CA that trusts
none of them (what a client with the wrong trust store sees). Keys are ECDSA P-256:
fast to make, and the curve Cloudflare and current clients prefer. Nothing here is for
production: the keys are unencrypted files in the test's own folder.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class Pki:
    """Paths of the PEM files ``make_pki`` wrote."""

    ca: Path  # the CA certificate: what clients and servers trust
    cert: Path  # server certificate (localhost, 127.0.0.1, ::1), signed by ``ca``
    key: Path
    client_cert: Path  # client certificate, signed by ``ca``
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting only it must fail


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str,
          usage: x509.ObjectIdentifier, names: tuple[str, ...] = (),
          ips: tuple[str, ...] = ()) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(folder: Path, *, names: tuple[str, ...] = SERVER_NAMES,
             ips: tuple[str, ...] = SERVER_IPS) -> Pki:
    """A fresh CA with a server and a client certificate, written into ``folder``.

    ``names``/``ips`` are the server certificate's subject alternative names: a test of
    hostname verification gives it names that do not include the address it dials.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("QNP test CA")
    server, server_key = _leaf(ca, ca_key, names[0] if names else "qnp-test-server",
                               ExtendedKeyUsageOID.SERVER_AUTH, names, ips)
    client, client_key = _leaf(ca, ca_key, "qnp-test-client", ExtendedKeyUsageOID.CLIENT_AUTH)
    other, _ = _ca("QNP unrelated CA")
    pki = Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key",
              folder / "client.pem", folder / "client.key", folder / "other-ca.pem")
    _write_cert(pki.ca, ca)
    _write_cert(pki.cert, server)
    _write_key(pki.key, server_key)
    _write_cert(pki.client_cert, client)
    _write_key(pki.client_key, client_key)
    _write_cert(pki.other_ca, other)
    return pki
