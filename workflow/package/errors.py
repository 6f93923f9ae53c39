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


class UnsafePath(PackageError):
    """The signed manifest names a path that would leave the folder it is opened into, collide with another, or a
    ciphertext file other than those pack writes; or the package holds ciphertext the manifest does not list."""


class UnsafeDestination(PackageError):
    """`open --into` was given a folder others could read or write, or one that already holds something."""
