"""What a signed manifest may name, checked at verify time before any path is used: relative file paths that stay
inside the folder they are opened into, each once and never both a file and a folder; and exactly the ciphertext
files pack writes (payload/00000.bin, payload/00001.bin, ...), with nothing else in payload/."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from workflow.package.errors import UnsafePath

PAYLOAD = "payload"


def ciphertext_name(index: int) -> str:
    return f"{PAYLOAD}/{index:05d}.bin"


def check_path(path: object) -> str:
    """A file path as the manifest must give it: relative, '/'-separated, no empty, '.' or '..' part, no backslash
    or NUL; so that joined to any folder it names a file inside that folder."""
    if not isinstance(path, str) or not path:
        raise UnsafePath(f"manifest path {path!r} is not a non-empty string")
    if path.startswith("/"):
        raise UnsafePath(f"manifest path {path!r} is absolute; package paths are relative to the folder opened into")
    if "\\" in path or "\0" in path:
        raise UnsafePath(f"manifest path {path!r} holds a backslash or NUL; package paths use '/' only")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise UnsafePath(f"manifest path {path!r} has an empty, '.' or '..' part; it could name a file outside the folder")
    return path


def check_manifest(package: Path, manifest: dict, header: dict) -> None:
    """Every name in the (already signature-checked) manifest and header is safe to use, and payload/ holds exactly
    the ciphertext files they list."""
    entries, described = manifest.get("files"), header.get("files")
    chunk_size = header.get("chunk_size")
    if not isinstance(entries, list) or not isinstance(described, list) or len(entries) != len(described):
        raise UnsafePath(f"{package}: the manifest and header must list the same files")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise UnsafePath(f"{package}: chunk_size {chunk_size!r} is not a positive integer")
    files: set[str] = set()
    folders: set[str] = set()
    for index, (entry, told) in enumerate(zip(entries, described)):
        path = check_path(entry.get("path"))
        if path in files:
            raise UnsafePath(f"{package}: manifest path {path!r} is listed twice")
        files.add(path)
        parts = path.split("/")
        folders.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
        size = entry.get("size")
        if told.get("path") != path or told.get("size") != size or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UnsafePath(f"{package}: header and manifest disagree on file {index} ({told.get('path')!r} vs {path!r})")
        if told.get("chunks") != max(1, -(-size // chunk_size)):
            raise UnsafePath(f"{package}: {path!r} has {told.get('chunks')!r} chunks for {size} bytes in chunks of {chunk_size}")
        if entry.get("ciphertext") != ciphertext_name(index):
            raise UnsafePath(f"{package}: {path!r} names ciphertext {entry.get('ciphertext')!r}; file {index} must be "
                             f"{ciphertext_name(index)!r}")
    both = sorted(files & folders)
    if both:
        raise UnsafePath(f"{package}: manifest path {both[0]!r} is both a file and the folder of another file")
    check_payload(package, {ciphertext_name(index) for index in range(len(entries))})


def check_payload(package: Path, listed: set[str]) -> None:
    """payload/ is a real folder whose entries are regular files the manifest lists (a missing one is reported
    later, as a missing chunk)."""
    folder = package / PAYLOAD
    if not os.path.lexists(folder):
        return  # every file's chunks are missing: check_length says so, file by file
    if not stat.S_ISDIR(os.lstat(folder).st_mode):
        raise UnsafePath(f"{package}: {PAYLOAD} is not a folder (a symbolic link or a file)")
    for name in sorted(os.listdir(folder)):
        relative = f"{PAYLOAD}/{name}"
        if relative not in listed:
            raise UnsafePath(f"{package}: {relative} is not listed in the signed manifest; remove it or re-pack")
        if not stat.S_ISREG(os.lstat(folder / name).st_mode):
            raise UnsafePath(f"{package}: {relative} is not a regular file (a symbolic link or a folder)")
