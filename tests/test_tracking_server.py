"""Tracking for clusters: the tiny DAG against a real `mlflow server` with a PostgreSQL backend store and a
proxied artifact root (tests/services.py starts both on loopback); every job attaches to one parent run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from services import MlflowServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.services,
    pytest.mark.skipif(not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("runuser") is None,
                       reason="needs Debian's postgresql (make system installs it)"),
]

JOBS = {"plan", "bootstrap", "generate_data", "prepare_data", "finetune"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_jobs_attach_to_one_parent_run_on_a_postgresql_backed_server(server, tmp_path, snakemake):
    snakemake(tmp_path, {"tracking": {"uri": server.uri}}, "results/plan/plan.json", "results/finetune/summary.json")
    assert not (tmp_path / "results" / "mlflow.db").exists() and not (tmp_path / "results" / "mlartifacts").exists()

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("ft2prod")
    assert experiment.artifact_location == "mlflow-artifacts:/" + experiment.experiment_id  # proxied by the server
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("ft2prod.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].data.tags["ft2prod.results_dir"] == str((tmp_path / "results").resolve())
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == JOBS and all(r.info.status == "FINISHED" for r in children.values())

    # artifacts went through the server into its artifact root
    assert {"plan.json", "plan.md", "plan.log"} <= {a.path for a in client.list_artifacts(children["plan"].info.run_id)}
    assert {"loss.png", "finetune.log"} <= {a.path for a in client.list_artifacts(children["finetune"].info.run_id)}
    stored = {p.name for p in server.artifacts.rglob("*") if p.is_file()}
    assert {"plan.json", "loss.png", "finetune.log"} <= stored
    # metrics from the training ranks (other processes, as on other nodes) reached the same run
    assert len(client.get_metric_history(children["finetune"].info.run_id, "loss")) >= 3

    # the backend store really is PostgreSQL
    import psycopg2

    with psycopg2.connect(server.backend_uri) as db, db.cursor() as cursor:
        cursor.execute("SELECT name, status FROM runs WHERE experiment_id = %s", (int(experiment.experiment_id),))
        rows = dict(cursor.fetchall())
    assert rows == {name: "FINISHED" for name in JOBS | {parents[0].info.run_name}}  # the parent finishes with its last job
