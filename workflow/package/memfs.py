"""Where plaintext weights may be written: a folder on a memory-backed filesystem (tmpfs, ramfs) that only this user
can enter, which open made itself or found empty, written only through its descriptor so that no symbolic link, planted
in it or swapped for it, is ever followed."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
from pathlib import Path

from workflow.package.errors import UnsafeDestination

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]


def _filesystem_type(target: Path | int) -> int | None:
    """statfs(2) of a path, or fstatfs(2) of an open descriptor."""
    buffer = _StatFs()
    libc = ctypes.CDLL(None, use_errno=True)
    done = libc.fstatfs(target, ctypes.byref(buffer)) if isinstance(target, int) else libc.statfs(str(target).encode(), ctypes.byref(buffer))
    return buffer.f_type if done == 0 else None


def on_memory_filesystem(path: Path | int) -> bool:
    return _filesystem_type(path) in (TMPFS_MAGIC, RAMFS_MAGIC)


class PrivateFolder:
    """The destination of `open --into`: made 0700 by us, or an existing folder that is ours, 0700 and empty; on a
    memory-backed filesystem. Its files are made 0600 and its folders 0700, each new (O_EXCL), relative to the
    folder's descriptor and never through a link.

    `replace` first empties a folder that passes the same owner and mode checks (the copy an earlier open left,
    as a Kubernetes init container finds when its pod restarts); a folder of another user, a looser mode or a
    symbolic link is still refused.
    """

    def __init__(self, path: str | Path, replace: bool = False) -> None:
        self.path = Path(path)
        self.created = self._make()
        try:
            self.descriptor = os.open(self.path, FOLDER)
        except OSError as err:
            raise UnsafeDestination(f"refusing to open into {self.path}: {err.strerror} (a symbolic link, or not a folder)") from None
        self.folders: set[str] = set()
        try:
            self._check(replace)
        except UnsafeDestination:  # a refused folder is left exactly as found (or removed again, when we made it)
            os.close(self.descriptor)
            if self.created:
                os.rmdir(self.path)
            raise

    def _make(self) -> bool:
        try:
            os.mkdir(self.path, 0o700)
            return True
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise UnsafeDestination(f"refusing to open into {self.path}: its parent folder does not exist; create it first") from None
        if os.path.islink(self.path):
            raise UnsafeDestination(f"refusing to open into {self.path}: it is a symbolic link (to {os.readlink(self.path)}); "
                                    "give a real folder, or a new path that open creates")
        return False

    def _check(self, replace: bool) -> None:
        info = os.fstat(self.descriptor)
        where = f"refusing to open into {self.path}"
        if not on_memory_filesystem(self.descriptor):
            raise UnsafeDestination(f"refusing to write plaintext weights to {self.path}: not a memory-backed filesystem (use /dev/shm or a tmpfs)")
        if info.st_uid != os.geteuid():
            raise UnsafeDestination(f"{where}: it is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}); "
                                    "give a new path, which open creates 0700")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise UnsafeDestination(f"{where}: its mode {stat.S_IMODE(info.st_mode):04o} lets other users in; it must be 0700 "
                                    "(or give a new path, which open creates 0700)")
        if replace and not self.created:
            self.empty()
        entries = os.listdir(self.descriptor)
        if entries:
            raise UnsafeDestination(f"{where}: it already holds {len(entries)} entries ({', '.join(sorted(entries)[:3])}, ...); "
                                    "give a new path, which open creates, or an empty folder of your own with mode 0700")

    def create(self, relative: str):
        """A new 0600 file at `relative` (a path check_path accepted), in folders made 0700 by this open; a name that
        exists already, a link among them, is refused."""
        *folders, name = relative.split("/")
        parent = os.dup(self.descriptor)
        try:
            for depth, folder in enumerate(folders, 1):
                made = "/".join(folders[:depth])
                if made not in self.folders:
                    os.mkdir(folder, 0o700, dir_fd=parent)  # FileExistsError: something we did not make is in the way
                    self.folders.add(made)
                child = os.open(folder, FOLDER, dir_fd=parent)
                os.close(parent)
                parent = child
            return os.fdopen(os.open(name, NEW_FILE, 0o600, dir_fd=parent), "wb")
        except OSError as err:
            raise UnsafeDestination(f"refusing to write {relative} into {self.path}: {err.strerror} "
                                    "(something other than this open made that name; nothing is followed)") from None
        finally:
            os.close(parent)

    def empty(self) -> None:
        """Remove everything inside the folder, without following links (rmtree relative to our descriptor)."""
        for name in os.listdir(self.descriptor):
            if stat.S_ISDIR(os.stat(name, dir_fd=self.descriptor, follow_symlinks=False).st_mode):
                shutil.rmtree(name, dir_fd=self.descriptor)
            else:
                os.unlink(name, dir_fd=self.descriptor)

    def close(self, remove: bool = False) -> None:
        """Close the descriptor; with `remove`, leave nothing behind (the folder itself too when we made it)."""
        if remove:
            self.empty()
        os.close(self.descriptor)
        if remove and self.created:
            os.rmdir(self.path)
