"""The chunk format: each file as AES-256-GCM chunks under a fresh data key, whose nonce is (file index, chunk
index) and whose associated data binds the file path, the chunk index and whether it is the last; the data key is
wrapped by the KMS and carries a key check."""

from __future__ import annotations

import hashlib
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from workflow.package.errors import MissingChunk, PackageError, ReorderedChunk, TamperedPackage, WrongKey
from workflow.package.kms import Kms, KmsError

TAG = 16


def nonce(file_index: int, chunk_index: int) -> bytes:
    return struct.pack(">IQ", file_index, chunk_index)


def aad(path: str, chunk_index: int, final: bool) -> bytes:
    return json.dumps({"path": path, "chunk": chunk_index, "final": final}, sort_keys=True).encode()


def key_check(data_key: bytes) -> str:
    return hashlib.sha256(b"ft2prod-key-check" + data_key).hexdigest()[:32]


def chunk_count(path: Path, size: int) -> int:
    return max(1, -(-path.stat().st_size // size))


def unwrap_data_key(header: dict, kms: Kms) -> bytes:
    if header["kms"]["provider"] != kms.provider:
        raise WrongKey(f"the package's data key is wrapped by {header['kms']['key_id']}, not by a {kms.provider} key")
    try:
        data_key = kms.unwrap(header["wrapped_key"])
    except KmsError as err:
        raise WrongKey(f"{err} (package wrapped by {header['kms']['key_id']})") from None
    if key_check(data_key) != header["key_check"]:
        raise WrongKey(f"wrong key: {kms.key_id()} did not wrap this package's data key (wrapped by {header['kms']['key_id']})")
    return data_key


def check_length(package: Path, entry: dict, described: dict, chunk_size: int) -> None:
    found = (package / entry["ciphertext"]).stat().st_size if (package / entry["ciphertext"]).exists() else 0
    expected = described["size"] + described["chunks"] * TAG
    if found < expected:
        present = found // (chunk_size + TAG)
        raise MissingChunk(f"{entry['path']}: chunk {present} of {described['chunks']} is missing (file truncated)")
    if found > expected:
        raise TamperedPackage(f"{entry['path']}: {found - expected} bytes appended after the last chunk")


def diagnose(aead: AESGCM, file_index: int, path: str, chunk_index: int, chunks: int, sealed: bytes) -> PackageError:
    """Why a chunk failed authentication: another position's chunk (reordered), or altered bytes."""
    for other in range(chunks):
        if other == chunk_index:
            continue
        try:
            aead.decrypt(nonce(file_index, other), sealed, aad(path, other, other == chunks - 1))
        except InvalidTag:
            continue
        return ReorderedChunk(f"{path}: chunk {chunk_index} holds chunk {other}'s data (chunks reordered)")
    return TamperedPackage(f"{path}: chunk {chunk_index} fails authentication (altered)")


def decrypt(package: Path, header: dict, manifest: dict, data_key: bytes, sink=None) -> None:
    """Authenticate and decrypt every chunk in order, a chunk at a time, handing plaintext to sink(path, bytes|None)
    (None opens a new file). Raises on the first bad chunk."""
    aead = AESGCM(data_key)
    size = header["chunk_size"]
    for index, (entry, described) in enumerate(zip(manifest["files"], header["files"], strict=True)):
        check_length(package, entry, described, size)
        plain_hash = hashlib.sha256()
        if sink:
            sink(entry["path"], None)
        with open(package / entry["ciphertext"], "rb") as reader, ThreadPoolExecutor(max_workers=1) as hasher:
            hashed = None
            for chunk_index in range(described["chunks"]):
                sealed = reader.read(size + TAG)
                final = chunk_index == described["chunks"] - 1
                try:
                    plain = aead.decrypt(nonce(index, chunk_index), sealed, aad(entry["path"], chunk_index, final))
                except InvalidTag:
                    raise diagnose(aead, index, entry["path"], chunk_index, described["chunks"], sealed) from None
                if hashed:
                    hashed.result()
                hashed = hasher.submit(plain_hash.update, plain)  # beside decrypting the next chunk
                if sink:
                    sink(entry["path"], plain)
            if hashed:
                hashed.result()
        if plain_hash.hexdigest() != entry["sha256"]:
            raise TamperedPackage(f"{entry['path']}: decrypted content does not match the manifest")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()
