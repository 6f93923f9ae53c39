"""Encrypted, signed model packages: pack, verify, open, rotate the key (the chunk format in chunks.py, signing and
attestation in signing.py, where plaintext may go in memfs.py).

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

import ctypes
import hashlib
import json
import os
import secrets
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from workflow.package.chunks import aad, check_length, chunk_count, decrypt, key_check, nonce, sha256_file, unwrap_data_key
from workflow.package.errors import (MissingChunk, PackageError, ReorderedChunk, TamperedPackage, UnsafeDestination,  # noqa: F401
                                     UnsafePath, UnsignedPackage, WrongKey, WrongSigner)
from workflow.package.kms import Kms
from workflow.package.layout import check_path, ciphertext_name
from workflow.package.memfs import PrivateFolder
from workflow.package.signing import (FORMAT, Signed, attestation, digest, key_id, load_public_key,  # noqa: F401
                                      load_signing_key, public_key_path, public_pem, signed_manifest, signed_package, write_signed)
from workflow.progress import Progress


def pack(source: str | Path, out: str | Path, kms: Kms, signing_key: Ed25519PrivateKey, provenance: dict,
         chunk_size: int = 4 << 20) -> dict:
    """Encrypt every file of `source` into the package folder `out`, sign it, and return its manifest.

    Hashing the plaintext runs on a second thread beside encryption and ciphertext hashing (both release
    the GIL), so packing costs about one SHA-256 pass of wall time on two cores.
    """
    source, out = Path(source), Path(out)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        check_path(str(path.relative_to(source)))  # what verify would refuse, refused before anything is written
    (out / "payload").mkdir(parents=True, exist_ok=False)
    data_key = AESGCM.generate_key(bit_length=256)
    aead = AESGCM(data_key)
    header = {
        "format": FORMAT, "chunk_size": chunk_size,
        # Signed (through the header's digest) and kept by rotate-key: gateways refuse a package older than one they served.
        "created": datetime.now(UTC).isoformat(timespec="microseconds"),
        "kms": {"provider": kms.provider, "key_id": kms.key_id()},
        "wrapped_key": kms.wrap(data_key), "key_check": key_check(data_key),
        "files": [{"path": str(p.relative_to(source)), "size": p.stat().st_size, "chunks": chunk_count(p, chunk_size)} for p in files],
    }
    entries = []
    chunks = sum(f["chunks"] for f in header["files"])
    with ThreadPoolExecutor(max_workers=1) as hasher, Progress(chunks, "package: encrypt", unit="chunk") as shown:
        for index, (path, described) in enumerate(zip(files, header["files"])):
            plain_hash, cipher_hash = hashlib.sha256(), hashlib.sha256()
            target = out / ciphertext_name(index)
            with open(path, "rb") as reader, open(target, "wb") as writer:
                for chunk_index in shown.counted(range(described["chunks"])):
                    block = reader.read(chunk_size)
                    hashed = hasher.submit(plain_hash.update, block)
                    final = chunk_index == described["chunks"] - 1
                    sealed = aead.encrypt(nonce(index, chunk_index), block, aad(described["path"], chunk_index, final))
                    cipher_hash.update(sealed)
                    writer.write(sealed)
                    hashed.result()
            entries.append({"path": described["path"], "size": described["size"], "sha256": plain_hash.hexdigest(),
                            "ciphertext": ciphertext_name(index), "ciphertext_sha256": cipher_hash.hexdigest()})
    del aead, data_key
    write_signed(out, header, attestation(entries, provenance), entries, signing_key)
    return json.loads((out / "manifest.json").read_text())


def verify(package: str | Path, trusted: Ed25519PublicKey, kms: Kms | None = None) -> dict:
    """Check signature, manifest, attestation and every file's ciphertext digest; with kms, also authenticate
    and decrypt every chunk (in memory, a chunk at a time)."""
    package = Path(package)
    manifest, header, _ = signed_manifest(package, trusted)
    for entry, described in zip(manifest["files"], header["files"], strict=True):
        check_length(package, entry, described, header["chunk_size"])
        if kms is None and sha256_file(package / entry["ciphertext"]) != entry["ciphertext_sha256"]:
            raise TamperedPackage(f"{entry['path']}: ciphertext digest differs from the signed manifest")
    if kms is not None:
        decrypt(package, header, manifest, unwrap_data_key(header, kms))
    return manifest


OPENED_FROM = "opened_from.json"
"""Written last into a folder a package is opened into: the package's digest and signed creation time."""


def open_package(package: str | Path, trusted: Ed25519PublicKey, kms: Kms, into: str | Path | None = None,
                 replace: bool = False, signed: Signed | None = None) -> dict[str, bytes] | Path:
    """Verify and decrypt: into memory (a dict), or into the folder `into` on a memory-backed filesystem — never onto
    disk. `into` is made 0700 here, or must already be ours, 0700 and empty (`replace`: emptied first when it is ours
    and 0700); files are made 0600, each new, through the folder's descriptor, so no link is followed. A bad chunk
    anywhere leaves nothing behind. The folder also gets OPENED_FROM (read by opened_from). `signed`: the package's signed parts as the caller checked them (signed_package
    with `trusted`), opened as they are rather than read again."""
    package = Path(package)
    signed = signed or signed_package(package, trusted)
    manifest, header = signed.manifest, signed.header
    if into is None:
        files: dict[str, bytearray] = {}
        decrypt(package, header, manifest, unwrap_data_key(header, kms),
                lambda path, plain: files.setdefault(path, bytearray()).extend(plain or b""))
        return {path: bytes(data) for path, data in files.items()}
    folder = PrivateFolder(into, replace)  # checked before the KMS is asked for the key
    handle = None

    def write(path: str, plain: bytes | None) -> None:
        nonlocal handle
        if plain is None:
            if handle:
                handle.close()
            handle = folder.create(path)
        else:
            handle.write(plain)

    try:
        decrypt(package, header, manifest, unwrap_data_key(header, kms), write)
        if handle:
            handle.close()
        handle = folder.create(OPENED_FROM)  # a package file of that name is refused here, as any name twice
        handle.write(json.dumps({"sha256": signed.sha256, "created": header.get("created", "")}).encode())
    except BaseException:
        folder.close(remove=True)
        raise
    finally:
        if handle:
            handle.close()
    folder.close()
    return Path(into)


def opened_from(folder: str | Path) -> dict:
    """{"sha256", "created"} of the package `folder` was opened from (open_package wrote them from the verified
    signed header): what a gateway started on the folder checks against its anti-rollback floor and records."""
    try:
        record = json.loads((Path(folder) / OPENED_FROM).read_text())
        return {"sha256": str(record["sha256"]), "created": str(record["created"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PackageError(f"{folder} holds no record of the package it was opened from ({OPENED_FROM}, written by "
                           f"`python -m workflow.package open`; {type(err).__name__}): its age cannot be checked") from None


def rotate_key(package: str | Path, trusted_and_signing: Ed25519PrivateKey, old: Kms, new: Kms) -> dict:
    """Re-wrap the data key under a new KMS key and re-sign; the encrypted weights are not touched. The re-signed
    package is built beside the old one (its ciphertext hard-linked, not copied), checked, and exchanged with it in one
    atomic rename: a crash or a full disk at any point leaves either the old package or the new one, each verifying."""
    package = Path(package)
    manifest, header, statement = signed_manifest(package, trusted_and_signing.public_key())
    data_key = unwrap_data_key(header, old)
    header["kms"] = {"provider": new.provider, "key_id": new.key_id()}
    header["wrapped_key"] = new.wrap(data_key)
    staging = package.with_name(f".{package.name}.{secrets.token_hex(8)}.rotating")
    staging.mkdir(mode=0o700)
    try:
        (staging / "payload").mkdir()
        for entry in manifest["files"]:
            os.link(package / entry["ciphertext"], staging / entry["ciphertext"], follow_symlinks=False)
        write_signed(staging, header, statement, manifest["files"], trusted_and_signing)
        signed_manifest(staging, trusted_and_signing.public_key())
        os.chmod(staging, stat.S_IMODE(os.stat(package).st_mode))
        exchange(staging, package)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old signed files after the exchange, or the unfinished new ones
    return header["kms"]


def exchange(first: Path, second: Path) -> None:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"exchanging {first} and {second}: {os.strerror(error)}")
