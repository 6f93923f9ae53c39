"""The gateway's settings, read from the workflow config's `rollout.gateway` section (and `package` for keys)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ConfigDict, ValidationError

from workflow.config import Audit, Config, Deadlines, EngineConfig, PackageConfig, RateLimits, RefusalLimit, errors
from workflow.config import Limits as LimitSettings
from workflow.package import archive
from workflow.package import kms as kms_providers
from workflow.package.kms import owner_only_key
from workflow.serve.access import Policy
from workflow.serve.audit import AuditLog


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
    audit: Audit
    """The configured audit section (its path may be overridden by audit_path)."""
    denied_burst: int
    alert_window_s: float
    deadlines: Deadlines
    rate_limits: RateLimits
    refusal_limits: RefusalLimit
    """rollout.gateway.refusal_limits: refused requests per client address, and their aggregation."""
    engine: EngineConfig
    """The workflow's `engine` section: how to load the package's engine in-process."""
    upstream: str | None
    reasoning: str
    """rollout.gateway.reasoning: split (reasoning_content apart from content) or raw."""
    package_settings: PackageConfig
    package_root: Path
    """Where /admin/deploy finds packages by digest."""

    @classmethod
    def from_config(cls, config: Config, audit_path: str | Path | None = None) -> GatewaySettings:
        gateway = config.rollout.gateway
        return cls(
            model_name=config.package.model_name,
            limits=Limits(**gateway.limits.model_dump()),
            policy=Policy.from_config(gateway),
            api_keys=Path(gateway.api_keys),
            audit_path=Path(audit_path or gateway.audit.path),
            audit=gateway.audit,
            denied_burst=gateway.alerts.denied_burst,
            alert_window_s=gateway.alerts.window_s,
            deadlines=gateway.deadlines,
            rate_limits=gateway.rate_limits,
            refusal_limits=gateway.refusal_limits,
            engine=config.engine,
            upstream=gateway.upstream,
            reasoning=gateway.reasoning,
            package_settings=config.package,
            package_root=Path(gateway.package_root or config.package.backup_dir),
        )

    def audit_key(self, create: bool = True) -> bytes:
        """The key of the audit chain and of the deployments record (made on first use by the gateway)."""
        return owner_only_key(self.audit.key_file, create, self.audit.key_file_group, "audit")

    def audit_log(self, writer: bool = True) -> AuditLog:
        """The audit log with its key: the gateway is its writer; readers need the key to exist."""
        return AuditLog(self.audit_path, self.audit_key(create=writer), self.audit.retention_days, writer, self.audit.head_export_s)

    def kms(self):
        return kms_providers.from_config(self.package_settings.kms)

    def trusted_signer(self):
        """The signer packages must carry: `package.trusted_signer` (a public key), else the public half kept beside
        `package.signing_key` (keys/signing.pub). The gateway never reads the private signing key."""
        public = self.package_settings.trusted_signer or archive.public_key_path(self.package_settings.signing_key)
        if not Path(public).exists():
            raise ValueError(f"package.trusted_signer is null and {public} (the public half of package.signing_key, "
                             "written when a package is signed) does not exist: set package.trusted_signer to the signer's public key")
        return archive.load_public_key(public)
