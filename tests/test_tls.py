"""The gateway's certificates pass strict verification (as Python 3.13+ clients do by default), for real, over a
loopback TLS 1.3 handshake."""

from __future__ import annotations

import socket
import ssl
import threading

from cryptography import x509

from workflow.serve.tls import client_context, ensure_certificates, restrict_to_tls13


def handshake(files, client: ssl.SSLContext) -> str:
    server = restrict_to_tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    server.load_cert_chain(files.cert, files.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        connection, _ = listener.accept()
        try:
            with server.wrap_socket(connection, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, client.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version()
    finally:
        listener.close()
        thread.join(timeout=10)


def test_a_strict_client_verifies_the_made_certificates(tmp_path):
    files = ensure_certificates(tmp_path / "tls", ["localhost", "127.0.0.1"])
    strict = ssl.create_default_context(cafile=str(files.ca))
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    assert handshake(files, strict) == "TLSv1.3"
    assert client_context(files.ca).verify_flags & ssl.VERIFY_X509_STRICT
    server = x509.load_pem_x509_certificate(files.cert.read_bytes())
    usage = server.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign


def test_certificates_made_without_key_identifiers_are_made_anew(tmp_path):
    files = ensure_certificates(tmp_path / "tls", ["localhost"])
    old = x509.load_pem_x509_certificate(files.cert.read_bytes())
    # What earlier versions wrote: the same certificate without its key identifiers, refused by strict clients.
    builder = x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer).public_key(old.public_key()) \
        .serial_number(old.serial_number).not_valid_before(old.not_valid_before_utc).not_valid_after(old.not_valid_after_utc)
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    files.cert.write_bytes(builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    again = ensure_certificates(tmp_path / "tls", ["localhost"])
    assert x509.load_pem_x509_certificate(again.cert.read_bytes()).extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert handshake(again, client_context(again.ca)) == "TLSv1.3"
