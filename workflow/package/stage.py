"""package, register and backup: the selected engine as a verified package, a registered model version, a copy.

    snakemake results/package/registered.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from workflow.package import archive, kms as kms_providers
from workflow.tracking import Tracking, dir_bytes, git_commit, job_run, pipeline_run_id, sha256_tree

log = logging.getLogger(__name__)


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def provenance(config: dict, selection: dict, results: Path, base_model: str | Path, tracking: Tracking) -> dict:
    """Where the packaged model came from: inputs' digests, code, config, every gate, the engine build, the runs."""
    scheme = selection["selected"]
    parent = pipeline_run_id(tracking)
    client = MlflowClient()
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    return {
        "base_model": {"path": str(base_model), "sha256": sha256_tree(base_model)[0]},
        "datasets": read_json(results / "data" / "stats.json")["digests"],
        "calibration": {k: read_json(results / "quantize" / scheme / "quantize.json")[k] for k in ("calib_samples", "calib_sha256")},
        "code_commit": git_commit(),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "gates": {
            "evaluate": read_json(results / "evaluate" / "finetuned.json")["metrics"],
            "quantization": read_json(results / "evaluate_quantized" / f"{scheme}.json"),
            "engine": read_json(Path(selection["engine_dir"]) / "accuracy.json"),
            "selection": {k: selection[k] for k in ("selected", "policy", "latency_slo_p95_s", "backend")},
        },
        "engine_manifest": read_json(Path(selection["engine_dir"]) / "engine_manifest.json"),
        "mlflow": {"pipeline_run_id": parent, "runs": {r.info.run_name: r.info.run_id for r in children}},
    }


def package(selection_path: str | Path, base_model: str | Path, out_dir: str | Path, settings: dict, config: dict, tracking: Tracking) -> dict:
    """Pack the selected engine, verify the result end to end, and record it."""
    selection = read_json(selection_path)
    results = Path(selection_path).parent.parent
    out_dir = Path(out_dir)
    with job_run(tracking, "package", {"package": settings, "scheme": selection["selected"]}):
        kms = kms_providers.from_config(settings["kms"])
        signing_key = archive.load_signing_key(settings["signing_key"])
        manifest = archive.pack(selection["engine_dir"], out_dir, kms, signing_key,
                                provenance(config, selection, results, base_model, tracking), settings["chunk_mb"] << 20)
        archive.verify(out_dir, signing_key.public_key(), kms)
        record = {"package": str(out_dir), "sha256": archive.digest(out_dir), "signer": manifest["signer"],
                  "kms_key_id": kms.key_id(), "scheme": selection["selected"], "files": len(manifest["files"]),
                  "bytes": sum(f["size"] for f in manifest["files"])}
        mlflow.log_dict(record, "package.json")
        mlflow.log_artifact(str(out_dir / "attestation.json"))
        mlflow.log_artifact(str(out_dir / "signer.pub"))
        mlflow.set_tags({"ft2prod.package.sha256": record["sha256"], "ft2prod.package.signer": record["signer"]})
        log.info("packed and verified %s: %s", out_dir, json.dumps(record))
        return record


def register(package_dir: str | Path, out_path: str | Path, model_name: str, settings: dict, tracking: Tracking) -> dict:
    """A new model version for the package, alias `candidate`, tagged with digest, signer and scheme."""
    package_dir = Path(package_dir)
    manifest = read_json(package_dir / "manifest.json")
    statement = read_json(package_dir / "attestation.json")
    scheme = statement["predicate"]["gates"]["selection"]["selected"]
    size_mb = dir_bytes(package_dir) / 2**20
    with job_run(tracking, "register", {"model_name": model_name, "package": str(package_dir)}) as run:
        if size_mb <= settings["log_max_mb"]:
            mlflow.log_artifacts(str(package_dir), "package")  # ciphertext only: safe to copy
            source = mlflow.get_artifact_uri("package")
        else:
            source = package_dir.resolve().as_uri()
        client = MlflowClient()
        try:
            client.create_registered_model(model_name, description="ft2prod packages: encrypted, signed, attested engines")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        digest = archive.digest(package_dir)
        tags = {"package_sha256": digest, "signer": manifest["signer"], "scheme": scheme}
        version = client.create_model_version(model_name, source=source, run_id=run.info.run_id, tags=tags,
                                              description=f"{scheme} engine, package sha256 {digest}, signed by {manifest['signer']}")
        client.set_registered_model_alias(model_name, "candidate", version.version)
        record = {"model_name": model_name, "version": version.version, "alias": "candidate", "source": source} | tags
        Path(out_path).write_text(json.dumps(record, indent=1))
        mlflow.log_dict(record, "registered.json")
        return record


def backup(package_dir: str | Path, backup_root: str | Path, out_path: str | Path, signing_key: str | Path) -> dict:
    """Copy the package to the backup location and verify the copy against our signer (signature, manifest,
    every chunk's digest); no KMS access needed."""
    package_dir = Path(package_dir)
    digest = archive.digest(package_dir)
    target = Path(backup_root) / digest
    if not target.exists():
        shutil.copytree(package_dir, target.with_suffix(".partial"))
        target.with_suffix(".partial").rename(target)
    archive.verify(target, archive.load_signing_key(signing_key, create=False).public_key())
    record = {"package_sha256": digest, "backup": str(target.resolve())}
    Path(out_path).write_text(json.dumps(record, indent=1))
    return record
