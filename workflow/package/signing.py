"""Signing: the Ed25519 keys, the in-toto attestation, the signed manifest that binds header, attestation and
every file's digests, and its check."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from workflow.package.errors import PackageError, TamperedPackage, UnsignedPackage, WrongSigner
from workflow.package.layout import check_manifest

FORMAT = "ft2prod-package/1"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def public_key_path(signing_key: str | Path) -> Path:
    """Where the public half of `signing_key` is kept beside it (keys/signing.pem -> keys/signing.pub): what a gateway
    trusts when `package.trusted_signer` is null, so that it never reads the private key."""
    return Path(signing_key).with_suffix(".pub")


def load_signing_key(path: str | Path, create: bool = True) -> Ed25519PrivateKey:
    """The Ed25519 signing key (PEM, owner-only permissions), made on first use when `create`; its public half is
    written beside it (public_key_path) when missing."""
    path = Path(path)
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
    if os.stat(path).st_mode & 0o077:
        raise PackageError(f"signing key {path} must be readable by its owner only (chmod 600)")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    public = public_key_path(path)
    if not public.exists():
        public.write_bytes(public_pem(key.public_key()))
    return key


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    return serialization.load_pem_public_key(Path(path).read_bytes())


def attestation(entries: list[dict], provenance: dict) -> dict:
    """An in-toto Statement whose subjects are the plaintext files and whose predicate is the provenance."""
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": e["path"], "digest": {"sha256": e["sha256"]}} for e in entries],
        "predicateType": "https://ft2prod.dev/provenance/v1",
        "predicate": provenance,
    }


def write_signed(out: Path, header: dict, statement: dict, entries: list[dict], signing_key: Ed25519PrivateKey) -> None:
    header_bytes = json.dumps(header, indent=1).encode()
    statement_bytes = json.dumps(statement, indent=1).encode()
    (out / "header.json").write_bytes(header_bytes)
    (out / "attestation.json").write_bytes(statement_bytes)
    manifest = {
        "format": FORMAT,
        "signer": key_id(signing_key.public_key()),
        "header_sha256": hashlib.sha256(header_bytes).hexdigest(),
        "attestation_sha256": hashlib.sha256(statement_bytes).hexdigest(),
        "files": entries,
    }
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    (out / "manifest.json").write_bytes(manifest_bytes)
    (out / "manifest.sig").write_text(base64.b64encode(signing_key.sign(manifest_bytes)).decode())
    (out / "signer.pub").write_bytes(public_pem(signing_key.public_key()))


def digest(package: str | Path) -> str:
    """The package's identity: SHA-256 of its signed manifest."""
    return hashlib.sha256((Path(package) / "manifest.json").read_bytes()).hexdigest()


@dataclass(frozen=True)
class Signed:
    """A package's signed parts, parsed from the very bytes that were checked, and its digest (of those bytes)."""

    manifest: dict
    header: dict
    attestation: dict
    sha256: str


def signed_manifest(package: Path, trusted: Ed25519PublicKey) -> tuple[dict, dict, dict]:
    """(manifest, header, attestation): signed_package's parts."""
    signed = signed_package(package, trusted)
    return signed.manifest, signed.header, signed.attestation


def signed_package(package: Path, trusted: Ed25519PublicKey) -> Signed:
    """The package's manifest, header and attestation, each parsed from the very bytes whose signature and digests
    were checked, and its digest: nothing is read again after the check, so a file swapped in between is never used
    (deploy checks the floor and the digest on what it then opens). Every path they name is checked too (layout.py):
    a signature says who made a package, not that its paths are safe."""
    if not (package / "manifest.sig").exists() or not (package / "manifest.json").exists():
        raise UnsignedPackage(f"{package}: unsigned package (no manifest.json/manifest.sig); refusing to load it")
    manifest_bytes = (package / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    if manifest.get("signer") != key_id(trusted):
        raise WrongSigner(f"{package}: signed by {manifest.get('signer')}, but the trusted signer is {key_id(trusted)}")
    try:
        trusted.verify(base64.b64decode((package / "manifest.sig").read_text()), manifest_bytes)
    except (InvalidSignature, ValueError):
        raise TamperedPackage(f"{package}: the manifest signature does not verify with {key_id(trusted)}: manifest altered") from None
    checked = {}
    for name in ("header", "attestation"):
        data = (package / f"{name}.json").read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest[f"{name}_sha256"]:
            raise TamperedPackage(f"{package}: {name}.json was changed after signing")
        checked[name] = json.loads(data)
    check_manifest(package, manifest, checked["header"])
    return Signed(manifest, checked["header"], checked["attestation"], hashlib.sha256(manifest_bytes).hexdigest())
