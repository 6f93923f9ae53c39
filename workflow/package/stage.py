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

from workflow.config import Config, PackageConfig
from workflow.package import archive, kms as kms_providers
from workflow.tracking import Tracking, describe, dir_bytes, git_commit, job_run, pipeline_run_id, sha256_tree

log = logging.getLogger(__name__)

REGISTERED_MODEL_DESCRIPTION = (
    "ft2prod packages: encrypted, signed, attested inference engines, one version per pipeline run that reached register.\n\n"
    "Aliases: `candidate` — the newest registered version, awaiting rollout; `production` — the version serving; "
    "`previous` — the one production replaced (the rollback target). Each version's description lists its gates and package digest."
)


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def provenance(config: Config, selection: dict, results: Path, base_model: str | Path, tracking: Tracking) -> dict:
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
        "config_sha256": hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest(),
        "gates": {
            "evaluate": read_json(results / "evaluate" / "finetuned.json")["metrics"],
            "quantization": read_json(results / "evaluate_quantized" / f"{scheme}.json"),
            "engine": read_json(Path(selection["engine_dir"]) / "accuracy.json"),
            "selection": {k: selection[k] for k in ("selected", "policy", "latency_slo_p95_s", "backend")},
        },
        "engine_manifest": read_json(Path(selection["engine_dir"]) / "engine_manifest.json"),
        "mlflow": {"pipeline_run_id": parent, "runs": {r.info.run_name: r.info.run_id for r in children}},
    }


def package(selection_path: str | Path, base_model: str | Path, out_dir: str | Path, config: Config, tracking: Tracking) -> dict:
    """Pack the selected engine, verify the result end to end, and record it."""
    selection = read_json(selection_path)
    results = Path(selection_path).parent.parent
    out_dir, settings = Path(out_dir), config.package
    with job_run(tracking, "package", {"package": settings.model_dump(), "scheme": selection["selected"]}):
        kms = kms_providers.from_config(settings.kms)
        signing_key = archive.load_signing_key(settings.signing_key)
        manifest = archive.pack(selection["engine_dir"], out_dir, kms, signing_key,
                                provenance(config, selection, results, base_model, tracking), settings.chunk_mb << 20)
        archive.verify(out_dir, signing_key.public_key(), kms)
        record = {"package": str(out_dir), "sha256": archive.digest(out_dir), "signer": manifest["signer"],
                  "kms_key_id": kms.key_id(), "scheme": selection["selected"], "files": len(manifest["files"]),
                  "bytes": sum(f["size"] for f in manifest["files"])}
        mlflow.log_dict(record, "package.json")
        mlflow.log_artifact(str(out_dir / "attestation.json"))
        mlflow.log_artifact(str(out_dir / "signer.pub"))
        mlflow.set_tags({"ft2prod.package.sha256": record["sha256"], "ft2prod.package.signer": record["signer"]})
        describe(f"Package of the **{record['scheme']}** engine, verified end to end: sha256 `{record['sha256']}`, signer "
                 f"`{record['signer']}`, KMS key `{record['kms_key_id']}`, {record['files']} files, {record['bytes']:,} bytes encrypted.")
        log.info("packed and verified %s: %s", out_dir, json.dumps(record))
        return record


def version_card(statement: dict, digest: str, signer: str, pipeline_run: str) -> tuple[str, dict]:
    """A model version's Markdown description and tags: what it is, its scheme, every gate's numbers, the package."""
    predicate = statement["predicate"]
    gates, selection = predicate["gates"], predicate["gates"]["selection"]
    scheme, evaluation = selection["selected"], gates["evaluate"]
    quantization, engine, manifest = gates["quantization"], gates["engine"], predicate["engine_manifest"]
    description = "\n".join([
        f"{scheme} {manifest.get('target', {}).get('backend', selection['backend'])} engine of the fine-tuned model, "
        f"chosen by `{selection['policy']}` (p95 SLO {selection['latency_slo_p95_s']} s); an encrypted, signed, attested package.",
        "",
        f"- evaluation gate: accuracy {evaluation['accuracy']:.3f} (gain over base {evaluation['gain_over_base']:+.3f})",
        f"- quantization gate: {quantization['reason']}",
        f"- engine gate: {engine['reason']}",
        f"- package sha256 `{digest}`, signed by `{signer}`",
        f"- base model sha256 `{predicate['base_model']['sha256']}`, code `{predicate['code_commit'][:12]}`, pipeline run `{pipeline_run}`",
    ])
    tags = {"package_sha256": digest, "signer": signer, "scheme": scheme, "engine_accuracy": f"{engine['accuracy']:.4f}",
            "gates": "passed", "pipeline_run_id": pipeline_run, "git_commit": predicate["code_commit"]}
    return description, tags


def register(package_dir: str | Path, out_path: str | Path, settings: PackageConfig, tracking: Tracking) -> dict:
    """A new model version for the package, alias `candidate`, tagged with digest, signer and scheme."""
    package_dir = Path(package_dir)
    manifest = read_json(package_dir / "manifest.json")
    statement = read_json(package_dir / "attestation.json")
    size_mb, model_name = dir_bytes(package_dir) / 2**20, settings.model_name
    with job_run(tracking, "register", {"model_name": model_name, "package": str(package_dir)}) as run:
        if size_mb <= settings.log_max_mb:
            mlflow.log_artifacts(str(package_dir), "package")  # ciphertext only: safe to copy
            source = mlflow.get_artifact_uri("package")
        else:
            source = package_dir.resolve().as_uri()
        client = MlflowClient()
        try:
            client.create_registered_model(model_name, description=REGISTERED_MODEL_DESCRIPTION)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        digest = archive.digest(package_dir)
        description, tags = version_card(statement, digest, manifest["signer"], pipeline_run_id(tracking))
        version = client.create_model_version(model_name, source=source, run_id=run.info.run_id, tags=tags, description=description)
        client.set_registered_model_alias(model_name, "candidate", version.version)
        record = {"model_name": model_name, "version": version.version, "alias": "candidate", "source": source} | tags
        describe(f"Registered **{model_name}** version **{version.version}**, alias `candidate` ([open](#/models/{model_name}/versions/"
                 f"{version.version})).\n\n{description}")
        Path(out_path).write_text(json.dumps(record, indent=1))
        mlflow.log_dict(record, "registered.json")
        return record


def backup(package_dir: str | Path, out_path: str | Path, settings: PackageConfig) -> dict:
    """Copy the package to the backup location and verify the copy against our signer (signature, manifest,
    every chunk's digest); no KMS access needed."""
    package_dir = Path(package_dir)
    digest = archive.digest(package_dir)
    target = Path(settings.backup_dir) / digest
    if not target.exists():
        shutil.copytree(package_dir, target.with_suffix(".partial"))
        target.with_suffix(".partial").rename(target)
    archive.verify(target, archive.load_signing_key(settings.signing_key, create=False).public_key())
    record = {"package_sha256": digest, "backup": str(target.resolve())}
    Path(out_path).write_text(json.dumps(record, indent=1))
    return record
