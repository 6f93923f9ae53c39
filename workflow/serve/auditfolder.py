"""Files on the audit volume, which someone other than the gateway may be able to write (docs/security.md's fourth
attacker). Every file is opened relative to the folder's descriptor and never through a symbolic link; a new file
gets a random name, O_EXCL and fchmod 0600, and replaces the old one by a rename inside the folder; a link, a
hard-linked file, something that is not a regular file or a file of another user where the gateway keeps its own is
refused, not followed: the gateway never truncates, chmods or writes a file it did not make."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NO_LINK = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a FIFO planted in place of a file does not hang open


class UnsafeAuditFile(RuntimeError):
    """A link, a foreign or hard-linked file, or a non-file where the gateway keeps its audit files."""


def write_all(fd: int, data: bytes) -> None:
    """Write every byte or raise (ENOSPC, EFBIG, EIO): a short write is never taken for a whole one."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[written:]


class AuditFolder:
    """The folder holding the audit log, opened once (not through a link) and owned by this user or root (a mount
    point); `create` makes it when missing (the writer), else a missing folder reads as empty."""

    def __init__(self, path: str | Path, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.fd: int | None = os.open(self.path, FOLDER)
        except FileNotFoundError:
            self.fd = None
            return
        except OSError as err:
            raise UnsafeAuditFile(f"audit folder {self.path}: {err.strerror} (a symbolic link, or not a folder); "
                                  "give the real folder") from None
        owner = os.fstat(self.fd).st_uid
        if owner not in (os.geteuid(), 0):
            os.close(self.fd)
            raise UnsafeAuditFile(f"audit folder {self.path} belongs to uid {owner}, not to this user (uid {os.geteuid()}) "
                                  "or root: another user could swap its files")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _check(self, fd: int, name: str) -> None:
        info = os.fstat(fd)
        where = f"{self.path / name}"
        if not stat.S_ISREG(info.st_mode):
            why = "not a regular file"
        elif info.st_uid != os.geteuid():
            why = f"it belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
        elif info.st_nlink != 1:
            why = f"it has {info.st_nlink} hard links (another name elsewhere could be any file)"
        else:
            return
        os.close(fd)
        raise UnsafeAuditFile(f"{where}: {why}; refusing to use it — move it away and restart")

    def _open(self, name: str, flags: int, mode: int = 0o600) -> int | None:
        if self.fd is None:
            return None
        try:
            fd = os.open(name, flags | NO_LINK, mode, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO):
                raise UnsafeAuditFile(f"{self.path / name}: a symbolic link or special file; refusing to follow it") from None
            raise
        self._check(fd, name)
        os.set_blocking(fd, True)
        return fd

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        fd = self._open(name, os.O_RDONLY)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def reader(self, name: str):
        """A binary file object to stream the file, or None when it does not exist."""
        fd = self._open(name, os.O_RDONLY)
        return None if fd is None else os.fdopen(fd, "rb")

    def appender(self, name: str) -> int:
        """A descriptor appending to `name` (made 0600 when missing; also readable), the file checked as ours first."""
        fd = self._open(name, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        os.fchmod(fd, 0o600)
        return fd

    def replace(self, name: str, data: bytes) -> None:
        """Write `data` to a new file with a random name, then rename it over `name` (the rename replaces a link
        itself, never its target); a failed write leaves `name` as it was."""
        temporary = f".{name}.{secrets.token_hex(8)}.partial"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_LINK, 0o600, dir_fd=self.fd)
        try:
            os.set_blocking(fd, True)
            os.fchmod(fd, 0o600)
            write_all(fd, data)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.unlink(temporary, dir_fd=self.fd)
            raise

    def check(self, *names: str) -> None:
        """Refuse to start on any of `names` that exists but is a link, a special or foreign or hard-linked file."""
        for name in names:
            fd = self._open(name, os.O_RDONLY)
            if fd is not None:
                os.close(fd)

    def names(self, suffix: str) -> list[str]:
        """Names in the folder ending in `suffix` (other replicas' logs), sorted."""
        return sorted(n for n in os.listdir(self.fd) if n.endswith(suffix)) if self.fd is not None else []
