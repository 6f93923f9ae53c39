"""Key-encryption keys held outside the package: a local key file, a PKCS#11 HSM, or HashiCorp Vault Transit.

Each provider wraps a package's fresh data key and unwraps it again; the data key itself is never written
anywhere in the clear. Chosen in config (`package.kms`), one small interface.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from workflow.config import Kms as KmsSettings


class KmsError(RuntimeError):
    """The KMS refused, or holds a key other than the one that wrapped this package."""


class Kms(Protocol):
    provider: str

    def key_id(self) -> str: ...

    def wrap(self, data_key: bytes) -> str: ...

    def unwrap(self, wrapped: str) -> bytes: ...


def owner_only_key(path: str | Path, create: bool, group: int | None = None, what: str = "kms") -> bytes:
    """A 32-byte key from a file only its owner can read (made 0600 when missing and `create`); `group`: also
    readable, never writable, by that one group when the file belongs to it (see LocalKeyFile)."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise KmsError(f"{what}: key file {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(os.urandom(32))
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    group_may_read = 0o040 if group is not None and info.st_gid == group else 0
    if mode & 0o077 & ~group_may_read:
        also = (f", or also by group {group} (the pod's fsGroup; this file's group is {info.st_gid}) but never written by it"
                if group is not None else "")
        raise KmsError(f"{what}: key file {path} has permissions {mode:o}; it must be readable by its owner only (chmod 600){also}")
    key = path.read_bytes()
    if len(key) != 32:
        raise KmsError(f"{what}: key file {path} must hold 32 bytes (got {len(key)})")
    return key


@dataclass
class LocalKeyFile:
    """A 256-bit key in a file readable by its owner only (the embedded default). Wraps with AES key wrap (RFC 3394).

    `group`: also accept read (never write) by this one group when the file belongs to it: a Kubernetes Secret
    mounted with defaultMode 0400 in a pod with `fsGroup` arrives as 0440, group fsGroup (the kubelet adds group
    read), and the pod's fsGroup is that group. Any other group, group write or any access by others is refused.
    """

    path: str
    create: bool = True
    provider: str = "local"
    group: int | None = None

    def _key(self) -> bytes:
        return owner_only_key(self.path, self.create, self.group, "kms")

    def key_id(self) -> str:
        return "local:" + hashlib.sha256(b"ft2prod-kek-id" + self._key()).hexdigest()[:16]

    def wrap(self, data_key: bytes) -> str:
        return base64.b64encode(aes_key_wrap(self._key(), data_key)).decode()

    def unwrap(self, wrapped: str) -> bytes:
        try:
            return aes_key_unwrap(self._key(), base64.b64decode(wrapped))
        except InvalidUnwrap:
            raise KmsError(f"kms: wrong key: {self.key_id()} did not wrap this package's data key") from None


@dataclass
class Pkcs11Hsm:
    """An AES key inside a PKCS#11 token (an HSM; SoftHSM2 in the tests). The key never leaves the token."""

    module: str
    token_label: str
    key_label: str
    pin: str
    provider: str = "pkcs11"

    def _session(self):
        import pkcs11

        token = pkcs11.lib(self.module).get_token(token_label=self.token_label)
        return token.open(user_pin=self.pin, rw=True)

    def _kek(self, session):
        import pkcs11

        try:
            return session.get_key(label=self.key_label, key_type=pkcs11.KeyType.AES)
        except pkcs11.NoSuchKey:
            raise KmsError(f"kms: no AES key labelled {self.key_label!r} in token {self.token_label!r}") from None

    def key_id(self) -> str:
        return f"pkcs11:{self.token_label}/{self.key_label}"

    def wrap(self, data_key: bytes) -> str:
        iv = os.urandom(16)
        with self._session() as session:
            wrapped = self._kek(session).encrypt(data_key, mechanism_param=iv)
        return base64.b64encode(iv + wrapped).decode()

    def unwrap(self, wrapped: str) -> bytes:
        import pkcs11

        raw = base64.b64decode(wrapped)
        with self._session() as session:
            try:
                return bytes(self._kek(session).decrypt(raw[16:], mechanism_param=raw[:16]))
            except pkcs11.PKCS11Error as err:
                raise KmsError(f"kms: wrong key: {self.key_id()} could not unwrap this package's data key ({type(err).__name__})") from None


@dataclass
class VaultTransit:
    """HashiCorp Vault's Transit engine (`hvac`); the token comes from VAULT_TOKEN, never from config. Not run here."""

    url: str
    key_name: str
    mount_point: str
    provider: str = "vault"

    def _client(self):
        import hvac

        token = os.environ.get("VAULT_TOKEN")
        if not token:
            raise KmsError("kms: vault needs the VAULT_TOKEN environment variable")
        return hvac.Client(url=self.url, token=token)

    def key_id(self) -> str:
        return f"vault:{self.url}/{self.mount_point}/{self.key_name}"

    def wrap(self, data_key: bytes) -> str:
        reply = self._client().secrets.transit.encrypt_data(
            name=self.key_name, plaintext=base64.b64encode(data_key).decode(), mount_point=self.mount_point)
        return reply["data"]["ciphertext"]

    def unwrap(self, wrapped: str) -> bytes:
        import hvac

        try:
            reply = self._client().secrets.transit.decrypt_data(name=self.key_name, ciphertext=wrapped, mount_point=self.mount_point)
        except hvac.exceptions.InvalidRequest as err:
            raise KmsError(f"kms: wrong key: {self.key_id()} could not unwrap this package's data key ({err})") from None
        return base64.b64decode(reply["data"]["plaintext"])


def pin_from(variable: str) -> str:
    """The HSM user PIN from the environment; unset or empty is refused (a token with an empty PIN is no lock)."""
    pin = os.environ.get(variable)
    if not pin:
        raise KmsError(f"kms: pkcs11 needs the HSM user PIN in the environment variable {variable} "
                       f"({'empty' if pin == '' else 'not set'}); an empty PIN is refused")
    return pin


def from_config(settings: KmsSettings) -> Kms:
    """The provider named by `package.kms.provider`, with its settings (secrets come from the environment)."""
    if settings.provider == "local":
        return LocalKeyFile(settings.local.key_file)
    if settings.provider == "pkcs11":
        p = settings.pkcs11
        return Pkcs11Hsm(p.module, p.token_label, p.key_label, pin_from(p.pin_env))
    return VaultTransit(settings.vault.url, settings.vault.key_name, settings.vault.mount_point)
