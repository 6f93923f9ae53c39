"""Which registered version is in production: MLflow aliases `production` and `previous`, moved on promotion
and rollback, with tags that say when and by whom."""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


class RollbackImpossible(RuntimeError):
    """No `previous` version to go back to."""


def alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def promote(model_name: str, version: str) -> dict:
    """`production` -> version; the version it replaces keeps alias `previous` (unless it is the same one)."""
    client = MlflowClient()
    old = alias_version(client, model_name, "production")
    if old is not None and old != str(version):
        client.set_registered_model_alias(model_name, "previous", old)
    client.set_registered_model_alias(model_name, "production", str(version))
    when = datetime.now(UTC).isoformat(timespec="seconds")
    client.set_model_version_tag(model_name, str(version), "ft2prod.promoted_at", when)
    client.set_model_version_tag(model_name, str(version), "ft2prod.promoted_by", who())
    return {"model_name": model_name, "production": str(version), "previous": old if old != str(version) else
            alias_version(client, model_name, "previous"), "at": when, "by": who()}


def rollback(model_name: str) -> dict:
    """`production` -> the `previous` version; the rolled-back version is tagged and loses its aliases."""
    client = MlflowClient()
    previous = alias_version(client, model_name, "previous")
    current = alias_version(client, model_name, "production")
    if previous is None:
        raise RollbackImpossible(f"rollback: {model_name} has no version with alias 'previous' (production is {current})")
    client.set_registered_model_alias(model_name, "production", previous)
    client.delete_registered_model_alias(model_name, "previous")
    when = datetime.now(UTC).isoformat(timespec="seconds")
    if current is not None:
        client.set_model_version_tag(model_name, current, "ft2prod.rolled_back_at", when)
    client.set_model_version_tag(model_name, previous, "ft2prod.promoted_at", when)
    client.set_model_version_tag(model_name, previous, "ft2prod.promoted_by", who())
    return {"model_name": model_name, "production": previous, "rolled_back": current, "at": when, "by": who(),
            "source": client.get_model_version(model_name, previous).source}
