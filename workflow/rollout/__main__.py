"""Roll production back to the previous version, and redeploy it.

    FT2PROD_ADMIN_KEY=ftk-... python -m workflow.rollout rollback --gateway https://127.0.0.1:8443 [--config config/config.yaml]

Moves MLflow alias `production` to the `previous` version, then redeploys that version's package (found by its
digest under `package.backup_dir`): on a running gateway through its admin endpoint (`--gateway`), or on
Kubernetes by rendering and applying the manifests for it (`rollout.kubernetes.context`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import httpx2
import mlflow
from mlflow.tracking import MlflowClient

from workflow.config import Config, ConfigError, load
from workflow.package import archive
from workflow.rollout import kubernetes, registry
from workflow.serve.settings import GatewaySettings
from workflow.serve.tls import client_context
from workflow.tracking import Tracking, describe, job_run
from workflow.wait import wait_for


def redeploy_gateway(url: str, ca: Path, admin_key: str, package: Path, digest: str, timeout_s: float = 300) -> None:
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx2.Client(base_url=url, verify=client_context(ca), timeout=30, headers=headers) as client:
        # The gateway takes the package from its own package root (package.backup_dir) by digest: a rollback to
        # the package it served before the current one.
        client.post("/admin/deploy", json={"package_sha256": digest, "rollback": True}).raise_for_status()
        try:
            wait_for(lambda: client.get("/v1/deployment").json()["package"].get("sha256") == digest,
                     f"{url} to serve package {digest[:16]}…", timeout_s)
        except TimeoutError as err:
            raise RuntimeError(f"rollback: {err}") from None


def rollback(config: Config, gateway_url: str | None, admin_key: str | None, results_dir: str = "results") -> dict:
    tracking = Tracking.from_config(config, results_dir=results_dir)
    mlflow.set_tracking_uri(tracking.resolved_uri())
    model_name = config.package.model_name
    with job_run(tracking, "rollback", {"model_name": model_name}):
        record = registry.rollback(model_name)
        digest = MlflowClient().get_model_version(model_name, record["production"]).tags["package_sha256"]
        package = Path(config.package.backup_dir) / digest
        archive.verify(package, GatewaySettings.from_config(config).trusted_signer())
        k8s = config.rollout.kubernetes
        if config.rollout.target == "kubernetes" and k8s.context:
            signer = archive.public_pem(GatewaySettings.from_config(config).trusted_signer())
            folder = kubernetes.render(config, digest, Path(results_dir) / "rollout" / "k8s", signer)
            record["redeployed"] = kubernetes.apply(folder, k8s.context, k8s.namespace, k8s.name, k8s.startup_timeout_s)
        elif gateway_url:
            if not admin_key:
                raise ValueError("rollback: --gateway needs an admin API key in $FT2PROD_ADMIN_KEY")
            ca = Path(config.rollout.gateway.tls.dir) / "ca.pem"
            redeploy_gateway(gateway_url, ca, admin_key, package, digest)
            record["redeployed"] = {"gateway": gateway_url, "package": str(package)}
        record["package_sha256"] = digest
        mlflow.log_dict(record, "rollback.json")
        describe(f"{model_name}: `production` → version **{record['production']}** (rolled back from {record['rolled_back']}), "
                 f"package `{digest}`, by {record['by']} at {record['at']}.")
        return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow.rollout", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/config.yaml")
    commands = parser.add_subparsers(dest="command", required=True)
    back = commands.add_parser("rollback", help="production -> previous, and redeploy it")
    back.add_argument("--gateway", help="URL of the running gateway to redeploy on (admin key in $FT2PROD_ADMIN_KEY)")
    back.add_argument("--results", default="results", help="the pipeline's results folder (its MLflow parent run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        record = rollback(load(args.config), args.gateway, os.environ.get("FT2PROD_ADMIN_KEY"), args.results)
    except (ConfigError, ValueError, registry.RollbackImpossible, archive.PackageError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
