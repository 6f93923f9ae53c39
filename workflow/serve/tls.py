"""TLS 1.3 only: a local CA and server certificate for the embedded default, and the contexts that enforce it.

Production deployments bring their own certificate (a Kubernetes TLS Secret, a corporate CA); the local CA
exists so the embedded default and the canary speak real, verified TLS.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _certificate(subject: str, key, issuer: str, issuer_key, hosts: list[str] | None, days: int) -> x509.Certificate:
    """A certificate that strict verifiers accept (Python 3.13+ default contexts set VERIFY_X509_STRICT): subject
    and authority key identifiers, and key usage on both the CA and the server certificate."""
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
    if hosts is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = (builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def ensure_certificates(directory: str | Path, hosts: list[str], days: int = 365) -> TlsFiles:
    """A CA and a server certificate for `hosts` under directory, made once (keys owner-only)."""
    directory = Path(directory)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if files.ca.exists() and files.cert.exists() and files.key.exists() and not _made_before_strict(files):
        return files
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("ft2prod local CA", ca_key, "ft2prod local CA", ca_key, None, days)
    server = _certificate(hosts[0], server_key, "ft2prod local CA", ca_key, hosts, days)
    _write_key(files.key, server_key)
    files.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return files


def _made_before_strict(files: TlsFiles) -> bool:
    """Certificates this module made before it wrote key identifiers, which strict clients refuse: made anew."""
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    if cert.issuer.rfc4514_string() != "CN=ft2prod local CA":
        return False  # a certificate someone brought: theirs to keep
    try:
        cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        return False
    except x509.ExtensionNotFound:
        return True


def restrict_to_tls13(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def client_context(ca: str | Path, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A verifying client context, strict as Python 3.13's default (VERIFY_X509_STRICT); `maximum` lets the canary
    play an old client."""
    context = ssl.create_default_context(cafile=str(ca))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = maximum
    return context
