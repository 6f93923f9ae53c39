"""The gateway's settings, read from the workflow config's `rollout.gateway` section (and `package` for keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ConfigDict, ValidationError

from workflow.config import Limits as LimitSettings
from workflow.config import errors
from workflow.package import archive
from workflow.package import kms as kms_providers
from workflow.serve.access import Policy


class Limits(LimitSettings):
    """The gateway's live request limits: the configured ones, which admins change at run time."""

    model_config = ConfigDict(frozen=False)

    def update(self, changes: dict) -> None:
        """Apply all of `changes` or, when one is wrong, none (ValueError naming the limit and what is allowed)."""
        try:
            checked = LimitSettings.model_validate(self.model_dump() | changes, strict=True)
        except ValidationError as exc:
            raise ValueError(errors(exc, LimitSettings, "limits")) from None
        for name in changes:
            setattr(self, name, getattr(checked, name))


@dataclass
class GatewaySettings:
    model_name: str
    """The model id clients name in requests (`package.model_name`)."""
    limits: Limits
    policy: Policy
    api_keys: Path
    audit_path: Path
    retention_days: int
    log_text: bool
    """Write prompts and outputs into the audit log (off by default: the log holds metadata only)."""
    denied_burst: int
    alert_window_s: float
    deadlines: dict = field(default_factory=dict)
    """rollout.gateway.deadlines: header_s, body_s, keep_alive_s."""
    rate_limits: dict = field(default_factory=dict)
    """rollout.gateway.rate_limits: {role: {requests_per_minute, burst}}."""
    engine: dict = field(default_factory=dict)
    """The workflow's `engine` section: how to load the package's engine in-process."""
    upstream: str | None = None
    package_settings: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict, audit_path: str | Path | None = None) -> GatewaySettings:
        gateway = config["rollout"]["gateway"]
        return cls(
            model_name=config["package"]["model_name"],
            limits=Limits(**gateway["limits"]),
            policy=Policy.from_config(gateway),
            api_keys=Path(gateway["api_keys"]),
            audit_path=Path(audit_path or gateway["audit"]["path"]),
            retention_days=gateway["audit"]["retention_days"],
            log_text=gateway["audit"]["log_text"],
            denied_burst=gateway["alerts"]["denied_burst"],
            alert_window_s=gateway["alerts"]["window_s"],
            deadlines=gateway["deadlines"],
            rate_limits=gateway["rate_limits"],
            engine=config["engine"],
            upstream=gateway["upstream"],
            package_settings=config["package"],
        )

    def kms(self):
        return kms_providers.from_config(self.package_settings["kms"])

    def trusted_signer(self):
        """The signer packages must carry: `package.trusted_signer` (a public key), else the local signing key's."""
        public = self.package_settings.get("trusted_signer")
        if public:
            return archive.load_public_key(public)
        return archive.load_signing_key(self.package_settings["signing_key"], create=False).public_key()
