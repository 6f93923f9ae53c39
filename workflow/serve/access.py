"""Who may call what, from where: API keys (stored only as SHA-256), roles, per-role IP allow-lists.

    python -m workflow.serve keys add --id alice --role analyst   # prints the key once
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from workflow.config import Gateway
from workflow.roles import ROLES

KEY_PREFIX = "ftk-"
log = logging.getLogger(__name__)


class UnsafeKeyFile(ValueError):
    """The API-key file may be written by someone other than its owner: its keys cannot be trusted."""


class Denied(Exception):
    """A refused request: the HTTP status and the reason given to the caller and the audit log."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers


@dataclass(frozen=True)
class Identity:
    key_id: str
    role: str


def key_hash(key: str) -> str:
    # Keys are 256-bit random tokens, so a plain SHA-256 is enough (no dictionary to guess from).
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The API-key file: {"keys": [{"id", "role", "sha256", "created", "expires"?}]}, owner-only. Keys never stored.

    A running gateway sees every change to the file at the next request (`keys revoke` takes effect at once), and
    refuses a key past its `expires` time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: tuple | None = None
        self._load()

    def _stamp(self) -> tuple | None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        self._mode = info.st_mode, info.st_uid
        return info.st_ino, info.st_mtime_ns, info.st_size

    def _loose(self) -> bool:
        """A chmod or chown changes no content stamp: the mode and owner are checked on every request too."""
        mode, owner = getattr(self, "_mode", (0, os.geteuid()))
        return bool(stat.S_IMODE(mode) & 0o026) or owner not in (os.geteuid(), 0)

    def _load(self) -> None:
        """Read the file through one descriptor after checking, on that descriptor (a Kubernetes Secret's file is a
        link into its volume: the file it names is what is checked), that only its
        owner (this user, or root for a mounted Secret) may write it and others may not read it: on every reload, so a
        file loosened while the gateway runs is refused, not trusted (UnsafeKeyFile)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._seen, self.entries, self.by_hash = None, [], {}
            return
        except OSError as err:
            raise UnsafeKeyFile(f"API-key file {self.path}: {err.strerror}; refusing it") from None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            mode = stat.S_IMODE(info.st_mode)
            if not stat.S_ISREG(info.st_mode) or info.st_uid not in (os.geteuid(), 0) or mode & 0o026:
                raise UnsafeKeyFile(f"API-key file {self.path} has mode {mode:04o} and owner uid {info.st_uid}: it must be a "
                                    "file of this user (or root) that no group or other user can write, nor others read "
                                    f"(chmod 600); every key is refused until it is")
            entries = json.loads(handle.read())["keys"]
        self._seen = (info.st_ino, info.st_mtime_ns, info.st_size)
        self.entries, self.by_hash = entries, {entry["sha256"]: entry for entry in entries}

    def add(self, key_id: str, role: str, expires_days: float | None = None) -> str:
        if role not in ROLES:
            raise ValueError(f"keys: role must be one of {', '.join(ROLES)} (got {role!r})")
        if any(entry["id"] == key_id for entry in self.entries):
            raise ValueError(f"keys: id {key_id!r} exists in {self.path}; revoke it first or pick another id")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        entry = {"id": key_id, "role": role, "sha256": key_hash(key), "created": now.isoformat()}
        if expires_days is not None:
            entry["expires"] = (now + timedelta(days=expires_days)).isoformat()
        self.entries.append(entry)
        self.by_hash[entry["sha256"]] = entry
        self._write()
        return key

    def revoke(self, key_id: str) -> None:
        kept = [entry for entry in self.entries if entry["id"] != key_id]
        if len(kept) == len(self.entries):
            raise ValueError(f"keys: no key with id {key_id!r} in {self.path}")
        self.entries = kept
        self.by_hash = {entry["sha256"]: entry for entry in kept}
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"keys": self.entries}, handle, indent=1)
        partial.replace(self.path)
        self._seen = self._stamp()

    def identify(self, authorization: str | None) -> Identity:
        if not authorization or not authorization.startswith("Bearer "):
            raise Denied(401, "no_key", "missing API key: send 'Authorization: Bearer <key>'")
        if self._stamp() != self._seen or self._loose():  # changed since: read again (one stat per request)
            try:
                self._load()
            except UnsafeKeyFile as err:
                log.error("ALERT %s", err)
                raise Denied(503, "key_file_unsafe", "the gateway's API-key file is unsafe; the operators are alerted") from None
        entry = self.by_hash.get(key_hash(authorization.removeprefix("Bearer ").strip()))
        if entry is None:
            raise Denied(401, "unknown_key", "unknown API key")
        if "expires" in entry and datetime.fromisoformat(entry["expires"]) <= datetime.now(UTC):
            raise Denied(401, "expired_key", f"API key {entry['id']} expired at {entry['expires']}")
        return Identity(entry["id"], entry["role"])


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(cidrs: list[str], key: str) -> list[Network]:
    try:
        return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]
    except ValueError as err:
        raise ValueError(f"config: {key}: {err}") from None


def client_ip(peer: str, forwarded_for: str | None, trusted_proxies: list[Network]) -> str:
    """The socket address, unless it is a trusted proxy: then the right-most X-Forwarded-For address that is
    not itself a trusted proxy (entries left of it could be forged by the client)."""
    address = ipaddress.ip_address(peer)
    if not forwarded_for or not any(address in net for net in trusted_proxies):
        return peer
    for hop in reversed([part.strip() for part in forwarded_for.split(",") if part.strip()]):
        try:
            hop_address = ipaddress.ip_address(hop)
        except ValueError:
            raise Denied(400, "bad_forwarded_for", f"X-Forwarded-For has a malformed address {hop!r}") from None
        if not any(hop_address in net for net in trusted_proxies):
            return hop
    return peer


@dataclass(frozen=True)
class Policy:
    allow: dict[str, list[Network]]
    trusted_proxies: list[Network]

    @classmethod
    def from_config(cls, gateway: Gateway) -> Policy:
        return cls(
            allow={role: networks(getattr(gateway.allow, role), f"rollout.gateway.allow.{role}") for role in ROLES},
            trusted_proxies=networks(gateway.trusted_proxies, "rollout.gateway.trusted_proxies"),
        )

    def check_address(self, identity: Identity, ip: str) -> None:
        address = ipaddress.ip_address(ip)
        if not any(address in net for net in self.allow[identity.role]):
            # The message names neither the role nor the allow-list (the audit record has both): a stolen key's
            # holder learns nothing about which keys work from where.
            raise Denied(403, "ip_not_allowed", f"{ip} is not on this key's address allow-list")

    def authorize(self, identity: Identity, ip: str, permission: str) -> None:
        self.check_address(identity, ip)
        if permission not in ROLES[identity.role].permissions:
            raise Denied(403, "role_forbidden", "this key may not call this endpoint")
