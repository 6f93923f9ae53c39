"""Encrypted, signed model packages: pack, verify, open, rotate the key.

A package is a folder:

    header.json       format, chunk size, KMS provider and key id, the wrapped data key, a key check, the files
    payload/NNNNN.bin each file as AES-256-GCM chunks (ciphertext || 16-byte tag), in order
    attestation.json  in-toto Statement: what the model is and where it came from
    manifest.json     every file: path, size, SHA-256 of plaintext and ciphertext, SHA-256 of each chunk;
                      and the SHA-256 of header.json and attestation.json
    manifest.sig      Ed25519 signature over manifest.json
    signer.pub        the signer's public key (trust comes from the key you pass to verify, not from this file)

Each chunk's nonce is (file index, chunk index) under a data key made fresh for the package, and its
associated data binds the file path, the chunk index and whether it is the last chunk, so chunks cannot be
altered, reordered, swapped between files or truncated without GCM refusing them. Memory stays at a few
chunks whatever the model size.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from workflow.package.kms import Kms, KmsError

FORMAT = "ft2prod-package/1"
TAG = 16
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6


class PackageError(RuntimeError):
    """A package that must not be loaded; the subclass says why."""


class UnsignedPackage(PackageError):
    pass


class WrongSigner(PackageError):
    pass


class TamperedPackage(PackageError):
    pass


class MissingChunk(PackageError):
    pass


class ReorderedChunk(PackageError):
    pass


class WrongKey(PackageError):
    pass


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def load_signing_key(path: str | Path, create: bool = True) -> Ed25519PrivateKey:
    """The Ed25519 signing key (PEM, owner-only permissions), made on first use when `create`."""
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
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    return serialization.load_pem_public_key(Path(path).read_bytes())


def _nonce(file_index: int, chunk_index: int) -> bytes:
    return struct.pack(">IQ", file_index, chunk_index)


def _aad(path: str, chunk_index: int, final: bool) -> bytes:
    return json.dumps({"path": path, "chunk": chunk_index, "final": final}, sort_keys=True).encode()


def _key_check(data_key: bytes) -> str:
    return hashlib.sha256(b"ft2prod-key-check" + data_key).hexdigest()[:32]


def _chunks(path: Path, size: int) -> int:
    return max(1, -(-path.stat().st_size // size))


def pack(source: str | Path, out: str | Path, kms: Kms, signing_key: Ed25519PrivateKey, provenance: dict,
         chunk_size: int = 4 << 20) -> dict:
    """Encrypt every file of `source` into the package folder `out`, sign it, and return its manifest.

    Hashing the plaintext runs on a second thread beside encryption and ciphertext hashing (both release
    the GIL), so packing costs about one SHA-256 pass of wall time on two cores.
    """
    source, out = Path(source), Path(out)
    (out / "payload").mkdir(parents=True, exist_ok=False)
    data_key = AESGCM.generate_key(bit_length=256)
    aead = AESGCM(data_key)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    header = {
        "format": FORMAT, "chunk_size": chunk_size,
        "kms": {"provider": kms.provider, "key_id": kms.key_id()},
        "wrapped_key": kms.wrap(data_key), "key_check": _key_check(data_key),
        "files": [{"path": str(p.relative_to(source)), "size": p.stat().st_size, "chunks": _chunks(p, chunk_size)} for p in files],
    }
    entries = []
    with ThreadPoolExecutor(max_workers=1) as hasher:
        for index, (path, described) in enumerate(zip(files, header["files"])):
            plain_hash, cipher_hash = hashlib.sha256(), hashlib.sha256()
            target = out / "payload" / f"{index:05d}.bin"
            with open(path, "rb") as reader, open(target, "wb") as writer:
                for chunk_index in range(described["chunks"]):
                    block = reader.read(chunk_size)
                    hashed = hasher.submit(plain_hash.update, block)
                    final = chunk_index == described["chunks"] - 1
                    sealed = aead.encrypt(_nonce(index, chunk_index), block, _aad(described["path"], chunk_index, final))
                    cipher_hash.update(sealed)
                    writer.write(sealed)
                    hashed.result()
            entries.append({"path": described["path"], "size": described["size"], "sha256": plain_hash.hexdigest(),
                            "ciphertext": f"payload/{index:05d}.bin", "ciphertext_sha256": cipher_hash.hexdigest()})
    del aead, data_key
    _write_signed(out, header, attestation(entries, provenance), entries, signing_key)
    return json.loads((out / "manifest.json").read_text())


def attestation(entries: list[dict], provenance: dict) -> dict:
    """An in-toto Statement whose subjects are the plaintext files and whose predicate is the provenance."""
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": e["path"], "digest": {"sha256": e["sha256"]}} for e in entries],
        "predicateType": "https://ft2prod.dev/provenance/v1",
        "predicate": provenance,
    }


def _write_signed(out: Path, header: dict, statement: dict, entries: list[dict], signing_key: Ed25519PrivateKey) -> None:
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


def _signed_manifest(package: Path, trusted: Ed25519PublicKey) -> dict:
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
    for name in ("header", "attestation"):
        if hashlib.sha256((package / f"{name}.json").read_bytes()).hexdigest() != manifest[f"{name}_sha256"]:
            raise TamperedPackage(f"{package}: {name}.json was changed after signing")
    return manifest


def _data_key(header: dict, kms: Kms) -> bytes:
    if header["kms"]["provider"] != kms.provider:
        raise WrongKey(f"the package's data key is wrapped by {header['kms']['key_id']}, not by a {kms.provider} key")
    try:
        data_key = kms.unwrap(header["wrapped_key"])
    except KmsError as err:
        raise WrongKey(f"{err} (package wrapped by {header['kms']['key_id']})") from None
    if _key_check(data_key) != header["key_check"]:
        raise WrongKey(f"wrong key: {kms.key_id()} did not wrap this package's data key (wrapped by {header['kms']['key_id']})")
    return data_key


def _check_length(package: Path, entry: dict, described: dict, chunk_size: int) -> None:
    found = (package / entry["ciphertext"]).stat().st_size if (package / entry["ciphertext"]).exists() else 0
    expected = described["size"] + described["chunks"] * TAG
    if found < expected:
        present = found // (chunk_size + TAG)
        raise MissingChunk(f"{entry['path']}: chunk {present} of {described['chunks']} is missing (file truncated)")
    if found > expected:
        raise TamperedPackage(f"{entry['path']}: {found - expected} bytes appended after the last chunk")


def _diagnose(aead: AESGCM, file_index: int, path: str, chunk_index: int, chunks: int, sealed: bytes) -> PackageError:
    """Why a chunk failed authentication: another position's chunk (reordered), or altered bytes."""
    for other in range(chunks):
        if other == chunk_index:
            continue
        try:
            aead.decrypt(_nonce(file_index, other), sealed, _aad(path, other, other == chunks - 1))
        except InvalidTag:
            continue
        return ReorderedChunk(f"{path}: chunk {chunk_index} holds chunk {other}'s data (chunks reordered)")
    return TamperedPackage(f"{path}: chunk {chunk_index} fails authentication (altered)")


def _decrypt(package: Path, header: dict, manifest: dict, data_key: bytes, sink=None) -> None:
    """Authenticate and decrypt every chunk in order, a chunk at a time, handing plaintext to sink(path, bytes|None)
    (None opens a new file). Raises on the first bad chunk."""
    aead = AESGCM(data_key)
    size = header["chunk_size"]
    for index, (entry, described) in enumerate(zip(manifest["files"], header["files"], strict=True)):
        _check_length(package, entry, described, size)
        plain_hash = hashlib.sha256()
        if sink:
            sink(entry["path"], None)
        with open(package / entry["ciphertext"], "rb") as reader, ThreadPoolExecutor(max_workers=1) as hasher:
            hashed = None
            for chunk_index in range(described["chunks"]):
                sealed = reader.read(size + TAG)
                final = chunk_index == described["chunks"] - 1
                try:
                    plain = aead.decrypt(_nonce(index, chunk_index), sealed, _aad(entry["path"], chunk_index, final))
                except InvalidTag:
                    raise _diagnose(aead, index, entry["path"], chunk_index, described["chunks"], sealed) from None
                if hashed:
                    hashed.result()
                hashed = hasher.submit(plain_hash.update, plain)  # beside decrypting the next chunk
                if sink:
                    sink(entry["path"], plain)
            if hashed:
                hashed.result()
        if plain_hash.hexdigest() != entry["sha256"]:
            raise TamperedPackage(f"{entry['path']}: decrypted content does not match the manifest")


def verify(package: str | Path, trusted: Ed25519PublicKey, kms: Kms | None = None) -> dict:
    """Check signature, manifest, attestation and every file's ciphertext digest; with kms, also authenticate
    and decrypt every chunk (in memory, a chunk at a time)."""
    package = Path(package)
    manifest = _signed_manifest(package, trusted)
    header = json.loads((package / "header.json").read_text())
    for entry, described in zip(manifest["files"], header["files"], strict=True):
        _check_length(package, entry, described, header["chunk_size"])
        if kms is None and _sha256_file(package / entry["ciphertext"]) != entry["ciphertext_sha256"]:
            raise TamperedPackage(f"{entry['path']}: ciphertext digest differs from the signed manifest")
    if kms is not None:
        _decrypt(package, header, manifest, _data_key(header, kms))
    return manifest


def _sha256_file(path: Path) -> str:
    digest_ = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 << 20):
            digest_.update(block)
    return digest_.hexdigest()


def on_memory_filesystem(path: Path) -> bool:
    import ctypes

    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    buffer = StatFs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(path).encode(), ctypes.byref(buffer)) != 0:
        return False
    return buffer.f_type in (TMPFS_MAGIC, RAMFS_MAGIC)


def open_package(package: str | Path, trusted: Ed25519PublicKey, kms: Kms, into: str | Path | None = None) -> dict[str, bytes] | Path:
    """Verify and decrypt: into memory (a dict), or into `into` on a memory-backed filesystem — never onto disk.
    A bad chunk anywhere leaves nothing behind."""
    package = Path(package)
    manifest = _signed_manifest(package, trusted)
    header = json.loads((package / "header.json").read_text())
    data_key = _data_key(header, kms)
    if into is None:
        files: dict[str, bytearray] = {}
        _decrypt(package, header, manifest, data_key, lambda path, plain: files.setdefault(path, bytearray()).extend(plain or b""))
        return {path: bytes(data) for path, data in files.items()}
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    if not on_memory_filesystem(into):
        raise PackageError(f"refusing to write plaintext weights to {into}: not a memory-backed filesystem (use /dev/shm or a tmpfs)")
    written: list[Path] = []

    def write(path: str, plain: bytes | None) -> None:
        target = into / path
        if plain is None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"")
            written.append(target)
        else:
            with open(target, "ab") as handle:
                handle.write(plain)

    try:
        _decrypt(package, header, manifest, data_key, write)
    except PackageError:
        for target in written:
            target.unlink(missing_ok=True)
        raise
    return into


def rotate_key(package: str | Path, trusted_and_signing: Ed25519PrivateKey, old: Kms, new: Kms) -> dict:
    """Re-wrap the data key under a new KMS key and re-sign; the encrypted weights are not touched."""
    package = Path(package)
    manifest = _signed_manifest(package, trusted_and_signing.public_key())
    header = json.loads((package / "header.json").read_text())
    data_key = _data_key(header, old)
    header["kms"] = {"provider": new.provider, "key_id": new.key_id()}
    header["wrapped_key"] = new.wrap(data_key)
    statement = json.loads((package / "attestation.json").read_text())
    _write_signed(package, header, statement, manifest["files"], trusted_and_signing)
    return header["kms"]
