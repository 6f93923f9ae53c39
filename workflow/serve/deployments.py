"""What a gateway has served, kept across restarts: the anti-rollback floor and the package served before.

`/admin/deploy` names a package by its digest; the gateway takes it from its fixed package root
(`rollout.gateway.package_root`, by default `package.backup_dir`, where the backup rule keeps packages by digest)
and never from a path a client sends. A package is refused when its signed creation time is older than the newest
package this gateway ever served, unless the request asks for a rollback and the package is the one served just
before the current one (what `python -m workflow.rollout rollback` does): an admin key can undo the last deploy,
not bring back any old signed package. The record lives beside the audit log and is keyed with the audit key as
the log is: someone who can write that volume cannot lower the floor.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

from workflow.serve.protocol import BadRequest

DIGEST = re.compile(r"^[0-9a-f]{64}$")


class DeploymentsTampered(RuntimeError):
    """The record does not match its key: someone changed it outside the gateway."""


def _mac(key: bytes, state: dict) -> str:
    return hmac.new(key, json.dumps(state, sort_keys=True).encode(), hashlib.sha256).hexdigest()


class Deployments:
    def __init__(self, path: str | Path, key: bytes) -> None:
        self.path, self.key = Path(path), key
        self.state = {"floor": "", "history": []}
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            self.state = {"floor": saved.get("floor", ""), "history": saved.get("history", [])}
            if not hmac.compare_digest(saved.get("mac", ""), _mac(key, self.state)):
                raise DeploymentsTampered(f"{self.path} was changed outside the gateway (its key does not match): "
                                          "the anti-rollback floor cannot be trusted; restore it from a backup or remove it knowingly")

    @property
    def floor(self) -> str:
        """The signed creation time of the newest package served ("" before any)."""
        return self.state["floor"]

    def previous(self) -> str | None:
        history = self.state["history"]
        return history[-2]["sha256"] if len(history) >= 2 else None

    def check(self, sha256: str, created: str, rollback: bool) -> None:
        """Refuse (409) a package older than the floor, unless it is an asked-for rollback to the previous one."""
        if created >= self.floor:
            return
        if rollback and sha256 == self.previous():
            return
        why = ("a rollback may only return to the package served before the current one"
               if rollback else "deploy it with \"rollback\": true if it is the package served before the current one")
        raise BadRequest(f"package {sha256[:16]}… was made {created or 'before versioning'}, before the newest package this "
                         f"gateway served ({self.floor}): refusing a rollback to an older package; {why}", 409)

    def record(self, sha256: str, created: str) -> None:
        """Note a package now served (written 0600, replaced atomically)."""
        history = [h for h in self.state["history"] if h["sha256"] != sha256] + [{"sha256": sha256, "created": created}]
        self.state = {"floor": max(self.floor, created), "history": history[-10:]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.state | {"mac": _mac(self.key, self.state)}, handle, indent=1)
        partial.replace(self.path)


def package_path(root: str | Path, sha256: str) -> Path:
    """The package `sha256` under the gateway's package root; 400 for anything but a digest, 404 if absent."""
    if not DIGEST.fullmatch(sha256):
        raise BadRequest("package_sha256 must be 64 lowercase hex digits (a package digest, as GET /v1/deployment shows)")
    path = Path(root) / sha256
    if not path.is_dir():
        raise BadRequest(f"no package {sha256[:16]}… in this gateway's package root", 404)
    return path
