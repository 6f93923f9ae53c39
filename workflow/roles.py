"""The gateway's roles, declared once: what each may do (the source document's access matrix) and its default
per-key request rate. The config's per-role sections (rollout.gateway.allow, rollout.gateway.rate_limits), the
gateway's access checks and the tests all read this table. Health probes need no key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    permissions: frozenset[str]
    requests_per_minute: float
    """Default sustained requests per minute of each key of the role."""
    burst: int
    """Default requests one key may send at once."""


ROLES = {
    role.name: role
    for role in (
        Role("admin", "deploy, undeploy and adjust the gateway", frozenset({"deploy", "adjust", "view"}), 60, 20),
        Role("analyst", "inference and results", frozenset({"infer", "view"}), 600, 60),
        Role("auditor", "audit logs, alerts and metrics", frozenset({"audit", "monitor", "view"}), 120, 30),
    )
}
