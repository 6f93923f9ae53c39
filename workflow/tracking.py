"""MLflow tracking: one parent run per results directory (the pipeline run), one child run per job.

Every stage opens its job run with `job_run(settings, "finetune", params)`; the parent is found or made
under a file lock, so parallel jobs and reruns of failed jobs attach to the same pipeline run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

from workflow.digest import sha256_file

PARENT_TAG = "ft2prod.results_dir"
SECRET_WORDS = {"key", "secret", "token", "password", "passphrase", "credential", "credentials"}


@dataclass(frozen=True)
class Tracking:
    uri: str
    """MLflow tracking URI; a relative sqlite path is resolved against the working directory."""
    experiment: str
    """MLflow experiment name."""
    results_dir: str = "results"
    """The pipeline's results directory: one parent run per directory."""
    run_name: str = "pipeline"
    """Name of the parent run."""
    log_path: str | None = None
    """The job's log file, attached to its run when the job ends (failed jobs too)."""

    @classmethod
    def from_config(cls, config: dict, log_path: str | None = None, results_dir: str = "results") -> Tracking:
        section = config["tracking"]
        return cls(
            uri=section["uri"],
            experiment=section["experiment"],
            results_dir=results_dir,
            run_name=config["run_name"],
            log_path=log_path,
        )

    def resolved_uri(self) -> str:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
            path = Path(uri[len(prefix):]).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            uri = prefix + str(path)
        return uri


def _experiment_id(tracking: Tracking) -> str:
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking.resolved_uri().startswith("sqlite:"):
        # Without a server, artifacts go beside the store rather than into ./mlruns of whatever cwd.
        artifact_location = (Path(tracking.results_dir) / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(tracking.experiment, artifact_location=artifact_location)


def pipeline_run_id(tracking: Tracking) -> str:
    """The parent run of this results directory, made on first use."""
    mlflow.set_tracking_uri(tracking.resolved_uri())
    results = Path(tracking.results_dir).resolve()
    results.mkdir(parents=True, exist_ok=True)
    with open(results / ".mlflow.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        experiment_id = _experiment_id(tracking)
        found = MlflowClient().search_runs(
            [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{results}'", max_results=1
        )
        if found:
            return found[0].info.run_id
        run = MlflowClient().create_run(
            experiment_id,
            run_name=tracking.run_name,
            tags={PARENT_TAG: str(results), "ft2prod.stage": "pipeline", "ft2prod.git_commit": git_commit()},
        )
        MlflowClient().set_terminated(run.info.run_id, "RUNNING")
        return run.info.run_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def redact(params: dict) -> dict:
    """params without any key that names a secret (`api_key`, `vault_token`, ...), at any depth."""
    return {
        key: redact(value) if isinstance(value, dict) else value
        for key, value in params.items()
        if not SECRET_WORDS & set(str(key).lower().split("_"))
    }


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested config to MLflow params: {"finetune": {"zero_stage": 2}} -> {"finetune.zero_stage": "2"}."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


@contextmanager
def job_run(tracking: Tracking, job: str, params: dict | None = None) -> Iterator[mlflow.ActiveRun]:
    """A child run of the pipeline run, named after the job; failed if the body raises.

    The parent's status follows its jobs: running while one runs, failed when the last one failed.
    """
    parent = pipeline_run_id(tracking)
    stage = job.split("/")[0]
    tags = {"ft2prod.stage": stage, "ft2prod.git_commit": git_commit()}
    if "/" in job:
        tags["ft2prod.scheme"] = job.split("/", 1)[1]
    client = MlflowClient()
    client.update_run(parent, status="RUNNING")
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=job, experiment_id=_experiment_id(tracking), parent_run_id=parent, tags=tags) as run:
            if params:
                safe = redact(params)
                mlflow.log_params(flatten(safe))
                mlflow.log_dict(safe, "config.json")
            try:
                yield run
                status = "FINISHED"
            finally:
                if tracking.log_path and Path(tracking.log_path).exists():
                    mlflow.log_artifact(tracking.log_path)
    finally:
        client.update_run(parent, status=status)


def sha256_tree(directory: str | Path) -> tuple[str, dict[str, str]]:
    """A digest of a folder: SHA-256 over the sorted (relative path, file digest) pairs, and the file digests."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(), files


def dir_bytes(directory: str | Path) -> int:
    """Total size of the files under a folder."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def log_dataset(path: str | Path, name: str, context: str) -> str:
    """Record a data file as a run input with its SHA-256 as the digest; returns the digest."""
    digest = sha256_file(path)
    with warnings.catch_warnings():
        # MLflow registers its local-file source under two schemes and warns that they are ambiguous.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(path).resolve()))
    dataset = MetaDataset(source=source, name=name, digest=digest[:32])
    mlflow.log_input(dataset, context=context)
    mlflow.set_tag(f"ft2prod.data.{name}.sha256", digest)
    return digest


def log_model_dir(directory: str | Path, artifact_path: str) -> str:
    """Record a model folder by reference: its path, tree digest and per-file digests, and its small
    descriptive files. Plaintext weights never go into MLflow; the encrypted package does (package stage)."""
    directory = Path(directory)
    tree, files = sha256_tree(directory)
    size_mb = dir_bytes(directory) / 2**20
    mlflow.log_dict({"sha256": tree, "files": files, "path": str(directory.resolve())}, f"{artifact_path}.sha256.json")
    mlflow.set_tags({f"ft2prod.{artifact_path}.sha256": tree, f"ft2prod.{artifact_path}.size_mb": f"{size_mb:.1f}"})
    for name in ("config.json", "ft2prod.json", "generation_config.json"):
        if (directory / name).exists():
            mlflow.log_artifact(str(directory / name), artifact_path)
    return tree
