"""MLflow tracking: one parent run per results directory (the pipeline run), one child run per job.

Every stage opens its job run with `job_run(settings, "finetune", params)`; the parent is found or made
under a file lock, so parallel jobs and reruns of failed jobs attach to the same pipeline run.

What a reviewer sees on every run: the tags `ft2prod.stage`, `ft2prod.scheme` (per-scheme jobs),
`ft2prod.git_commit` and `ft2prod.gate` (passed / failed for a stage with a gate; skipped when a gated job
stopped before its gate; none for a stage without one), and a Markdown description (the run page's
Description) saying what the stage does, with its headline numbers once the stage calls `describe`.
The pipeline summary on the parent run is the workflow's to refresh (the summary rule, and the Snakefile's
onsuccess/onerror handlers), not each job's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

from workflow.config import Config
from workflow.digest import sha256_file
from workflow.stages import STAGES, description

log = logging.getLogger(__name__)

PARENT_TAG = "ft2prod.results_dir"
GATE_TAG = "ft2prod.gate"
NOTE_TAG = "mlflow.note.content"  # the run page's Markdown "Description"
EXPERIMENT_KIND = "mlflow.experimentKind"
MAX_TAG_CHARS = 7900  # MLflow refuses tag values over 8000 characters
GATED = {stage.name for stage in STAGES if stage.gated}
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
    """The pipeline's name (config run_name); the parent run is named `<run_name> · <base model> · <date>`."""
    base_model: str = ""
    """The base model (config base_model: "bootstrap" or a checkpoint path), named in the parent run's name."""
    log_path: str | None = None
    """The job's log file, attached to its run when the job ends (failed jobs too)."""

    @classmethod
    def from_config(cls, config: Config, log_path: str | None = None, results_dir: str = "results") -> Tracking:
        return cls(
            uri=config.tracking.uri,
            experiment=config.tracking.experiment,
            results_dir=results_dir,
            run_name=config.run_name,
            base_model=config.base_model,
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
        if EXPERIMENT_KIND not in experiment.tags:
            MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        return experiment.experiment_id
    artifact_location = None
    if tracking.resolved_uri().startswith("sqlite:"):
        # Without a server, artifacts go beside the store rather than into ./mlruns of whatever cwd.
        artifact_location = (Path(tracking.results_dir) / "mlartifacts").resolve().as_uri()
    # The UI opens a model-training experiment in its classic runs view, not the GenAI evaluation view.
    return mlflow.create_experiment(tracking.experiment, artifact_location=artifact_location, tags={EXPERIMENT_KIND: "custom_model_development"})


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
            run_name=parent_name(tracking),
            tags={PARENT_TAG: str(results), "ft2prod.stage": "pipeline", "ft2prod.git_commit": git_commit(),
                  "ft2prod.run_name": tracking.run_name, "ft2prod.base_model": tracking.base_model, GATE_TAG: "skipped",
                  NOTE_TAG: f"**Pipeline {tracking.run_name}** on base model `{tracking.base_model}`. {description('pipeline')} "
                            "The summary appears here as jobs finish."},
        )
        MlflowClient().set_terminated(run.info.run_id, "RUNNING")
        return run.info.run_id


def parent_name(tracking: Tracking) -> str:
    """`<run_name> · <base model> · <UTC date>`, set once when the parent is made: reruns into the same results
    directory find the parent by its tag and keep the name (and the date the pipeline started)."""
    base = Path(tracking.base_model.rstrip("/")).name or "unknown base"
    return f"{tracking.run_name} · {base} · {datetime.now(UTC):%Y-%m-%d}"


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


def what_it_does(job: str) -> str:
    """The first lines of a job's run description: the job and what its stage does."""
    stage, _, scheme = job.partition("/")
    title = f"**{stage}**" + (f" · scheme `{scheme}`" if scheme else "")
    return f"{title} — {description(stage)}"


def set_note(text: str, run_id: str | None = None) -> None:
    """Set a run's Markdown description (the active run's without run_id), cut to what MLflow accepts."""
    if len(text) > MAX_TAG_CHARS:
        text = text[: MAX_TAG_CHARS - 40].rsplit("\n", 1)[0] + "\n\n… (cut: see the run's artifacts)"
    if run_id is None:
        mlflow.set_tag(NOTE_TAG, text)
    else:
        MlflowClient().set_tag(run_id, NOTE_TAG, text)


def describe(markdown: str) -> None:
    """The active job run's description: what its stage does, then `markdown` (its headline numbers)."""
    set_note(what_it_does(mlflow.active_run().info.run_name) + "\n\n" + markdown.strip())


class GateFailed(RuntimeError):
    """A model (or scheme) missed a threshold; the message names the metric, its value and the threshold."""


def record_gate(checks: list[dict]) -> bool:
    """Record the active job's gate: `ft2prod.gate` passed/failed and `gate.json` with every check.

    A check is {"name", "passed", "value", "threshold", "detail"} (the rollout report's form); the gate
    passes when every check does. Returns whether it passed.
    """
    passed = all(check["passed"] for check in checks)
    mlflow.set_tag(GATE_TAG, "passed" if passed else "failed")
    mlflow.log_dict({"passed": passed, "checks": checks}, "gate.json")
    return passed


@contextmanager
def job_run(tracking: Tracking, job: str, params: dict | None = None) -> Iterator[mlflow.ActiveRun]:
    """A child run of the pipeline run, named after the job; failed if the body raises.

    The parent's status follows its jobs: running while one runs, failed when the last one failed. A job that
    raises gets the error at the end of its description; a job that set no gate is tagged skipped (a gated
    stage that stopped before its gate) or none (a stage without a gate).
    """
    parent = pipeline_run_id(tracking)
    stage = job.split("/")[0]
    commit = git_commit()
    tags = {"ft2prod.stage": stage, "ft2prod.git_commit": commit, NOTE_TAG: what_it_does(job),
            "mlflow.source.name": f"ft2prod {stage}", "mlflow.source.type": "JOB", "mlflow.source.git.commit": commit}
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
            except BaseException as err:
                note = client.get_run(run.info.run_id).data.tags.get(NOTE_TAG, what_it_does(job))
                first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
                set_note(f"{note}\n\n**Failed:** `{type(err).__name__}: {first_line}`")
                raise
            finally:
                if GATE_TAG not in client.get_run(run.info.run_id).data.tags:
                    mlflow.set_tag(GATE_TAG, "skipped" if stage in GATED else "none")
                if tracking.log_path and Path(tracking.log_path).exists():
                    mlflow.log_artifact(tracking.log_path)
    finally:
        client.set_terminated(parent, status=status)  # end time: when its latest job ended


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
