"""Where plaintext weights may be written: only a memory-backed filesystem (tmpfs, ramfs)."""

from __future__ import annotations

from pathlib import Path

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6


def on_memory_filesystem(path: Path) -> bool:
    import ctypes

    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    buffer = StatFs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(path).encode(), ctypes.byref(buffer)) != 0:
        return False
    return buffer.f_type in (TMPFS_MAGIC, RAMFS_MAGIC)
