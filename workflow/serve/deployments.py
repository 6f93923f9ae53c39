"""What gateways have served, kept in the audit chain: the anti-rollback floor and the package served before.

`/admin/deploy` names a package by its digest; the gateway takes it from its fixed package root
(`rollout.gateway.package_root`, by default `package.backup_dir`, where the backup rule keeps packages by digest)
and never from a path a client sends. A package is refused when its signed creation time is older than the newest
package served, unless the request asks for a rollback and the package is the one served just before the current one
(what `python -m workflow.rollout rollback` does): an admin key can undo the last deploy, not bring back any old
signed package. The same check runs when a gateway starts with `--package`.

Every package served is a chained `package.served` record in the audit log (keyed with the audit key, verified at
start), and every prune carries the state forward in its chained `audit.prune` event: the floor is rebuilt from the
verified chain at start, so deleting or editing a separate record cannot lower it. Replicas that share the audit
folder (each writing its own `<name>.jsonl` with the same audit key, as the Kubernetes pods do) share one floor: the
floor is the newest package served in any chain in the folder, each verified first.
"""

from __future__ import annotations

import re
from pathlib import Path

from workflow.serve.audit import AuditLog
from workflow.serve.protocol import BadRequest

DIGEST = re.compile(r"^[0-9a-f]{64}$")
HISTORY = 10


def served_state(records) -> dict:
    """{"floor", "history"} from a chain's records: `package.served` events, and the state each prune carried."""
    state = {"floor": "", "history": []}
    for record in records:
        if record.get("event") == "package.served":
            entry = {"sha256": record["sha256"], "created": record["created"]}
            history = [h for h in state["history"] if h["sha256"] != entry["sha256"]] + [entry]
            state = {"floor": max(state["floor"], entry["created"]), "history": history[-HISTORY:]}
        elif record.get("event") == "audit.prune" and "carry" in record:
            state = {"floor": max(state["floor"], record["carry"]["floor"]), "history": record["carry"]["history"]}
    return state


class Deployments:
    """The served-package state of the gateway writing `audit`, rebuilt from its verified chain."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.state = served_state(audit.records())
        audit.carry = lambda: self.state  # every prune writes the state into its chained event

    @property
    def floor(self) -> str:
        """The signed creation time of the newest package served by this gateway or a replica beside it ("" before any)."""
        floors = [self.state["floor"]]
        for name in self.audit.folder.names(".jsonl"):
            if name != self.audit.name:
                replica = AuditLog(self.audit.path.with_name(name), self.audit.key)
                replica.verify(torn_ok=True)  # AuditTampered: a replica's chain that does not verify stops the deploy
                floors.append(served_state(replica.records(torn_ok=True))["floor"])
        return max(floors)

    def previous(self) -> str | None:
        history = self.state["history"]
        return history[-2]["sha256"] if len(history) >= 2 else None

    def check(self, sha256: str, created: str, rollback: bool) -> None:
        """Refuse (409) a package older than the floor, unless it is an asked-for rollback to the previous one."""
        floor = self.floor
        if created >= floor:
            return
        if rollback and sha256 == self.previous():
            return
        why = ("a rollback may only return to the package served before the current one"
               if rollback else "deploy it with \"rollback\": true if it is the package served before the current one")
        raise BadRequest(f"package {sha256[:16]}… was made {created or 'before versioning'}, before the newest package "
                         f"served ({floor}): refusing a rollback to an older package; {why}", 409)

    def record(self, sha256: str, created: str) -> None:
        """Note a package now served, as a chained record."""
        self.audit.append({"event": "package.served", "sha256": sha256, "created": created})
        self.state = served_state([{"event": "audit.prune", "carry": self.state},
                                   {"event": "package.served", "sha256": sha256, "created": created}])


def package_path(root: str | Path, sha256: str) -> Path:
    """The package `sha256` under the gateway's package root; 400 for anything but a digest, 404 if absent."""
    if not DIGEST.fullmatch(sha256):
        raise BadRequest("package_sha256 must be 64 lowercase hex digits (a package digest, as GET /v1/deployment shows)")
    path = Path(root) / sha256
    if not path.is_dir():
        raise BadRequest(f"no package {sha256[:16]}… in this gateway's package root", 404)
    return path
