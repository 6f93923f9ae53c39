"""Why a package must not be loaded: one exception class per reason, all PackageError."""

from __future__ import annotations


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
