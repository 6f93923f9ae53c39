"""Run names, descriptions and gate tags on every job run, and the pipeline summary on the parent run."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from workflow import summary
from workflow.stages import BY_NAME
from workflow.tracking import NOTE_TAG, GateFailed, Tracking, describe, job_run, pipeline_run_id, record_gate


@pytest.fixture
def named(tmp_path) -> Tracking:
    return Tracking(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="tests", results_dir=str(tmp_path / "results"),
                    run_name="r1-distill", base_model="/models/DeepSeek-R1-Distill-Qwen-1.5B/")


def children(tracking: Tracking) -> dict:
    parent = pipeline_run_id(tracking)
    client = MlflowClient()
    runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    return {r.info.run_name: r for r in runs}


def check(name: str, passed: bool, value: float, threshold: float) -> dict:
    return {"name": name, "passed": passed, "value": value, "threshold": threshold, "detail": f"{name} detail"}


def test_parent_is_named_for_pipeline_base_and_date_once(named):
    parent = MlflowClient(named.resolved_uri()).get_run(pipeline_run_id(named))
    assert parent.info.run_name == f"r1-distill · DeepSeek-R1-Distill-Qwen-1.5B · {datetime.now(UTC):%Y-%m-%d}"
    assert parent.data.tags["ft2prod.base_model"] == named.base_model and parent.data.tags["ft2prod.stage"] == "pipeline"
    renamed = Tracking(**{**named.__dict__, "run_name": "other"})
    assert pipeline_run_id(renamed) == parent.info.run_id, "the parent is found by its results directory, not its name"
    assert MlflowClient().get_run(parent.info.run_id).info.run_name == parent.info.run_name


def test_every_job_run_has_a_description_and_a_gate_tag(named):
    with job_run(named, "prepare_data"):
        describe("**240** rows")
    with pytest.raises(GateFailed), job_run(named, "evaluate"):
        record_gate([check("accuracy >= evaluate.gate.min_accuracy", False, 0.15, 0.5)])
        raise GateFailed("evaluate gate failed: accuracy 0.150 < evaluate.gate.min_accuracy 0.500")
    with pytest.raises(RuntimeError), job_run(named, "build_engine/int8_sq"):
        raise RuntimeError("builder crashed\nsecond line")
    runs = children(named)
    tags = {name: run.data.tags for name, run in runs.items()}
    assert tags["prepare_data"][NOTE_TAG] == "**prepare_data** — " + BY_NAME["prepare_data"].description + "\n\n**240** rows"
    assert tags["prepare_data"]["ft2prod.gate"] == "none", "a stage without a gate"
    assert tags["evaluate"]["ft2prod.gate"] == "failed"
    assert tags["evaluate"][NOTE_TAG].endswith("**Failed:** `GateFailed: evaluate gate failed: accuracy 0.150 < evaluate.gate.min_accuracy 0.500`")
    engine = tags["build_engine/int8_sq"]
    assert engine["ft2prod.gate"] == "skipped", "a gated stage that stopped before its gate"
    assert engine["ft2prod.scheme"] == "int8_sq" and engine[NOTE_TAG].startswith("**build_engine** · scheme `int8_sq` — ")
    assert engine[NOTE_TAG].endswith("**Failed:** `RuntimeError: builder crashed`")
    assert all(len(t["ft2prod.git_commit"]) in (40, 7) for t in tags.values())
    gate = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=runs["evaluate"].info.run_id, artifact_path="gate.json")).read_text())
    assert gate == {"passed": False, "checks": [check("accuracy >= evaluate.gate.min_accuracy", False, 0.15, 0.5)]}


def registered_candidate(tracking: Tracking, results: Path) -> None:
    """A model version with alias candidate, as the register stage leaves it (registered.json beside it)."""
    with job_run(tracking, "register") as run:
        client = MlflowClient()
        client.create_registered_model("m")
        version = client.create_model_version("m", source=mlflow.get_artifact_uri(), run_id=run.info.run_id,
                                              tags={"scheme": "int4_awq", "package_sha256": "ab" * 32})
        client.set_registered_model_alias("m", "candidate", version.version)
    (results / "package").mkdir(parents=True, exist_ok=True)
    (results / "package" / "registered.json").write_text(json.dumps({"model_name": "m", "version": version.version,
                                                                      "package_sha256": "ab" * 32}))


def test_summary_shows_gates_rollout_registry_and_links_to_child_runs(named):
    results = Path(named.results_dir)
    with job_run(named, "evaluate"):
        record_gate([check("accuracy >= evaluate.gate.min_accuracy", True, 0.8125, 0.5)])
    with job_run(named, "evaluate_quantized/fp8"):
        record_gate([check("accuracy loss <= quantize.max_accuracy_loss.fp8", False, 0.0625, 0.04)])
    registered_candidate(named, results)
    (results / "rollout").mkdir()
    report = {"passed": True, "version": "1", "package_sha256": "ab" * 32,
              "checks": [{"name": "canary error rate", "passed": True, "value": 0.0, "threshold": 0.01, "detail": "0 of 50 requests"},
                         {"name": "TLS 1.3 only", "passed": True, "value": "TLSv1.3", "threshold": "TLSv1.3", "detail": "handshake"}]}
    (results / "rollout" / "report.json").write_text(json.dumps(report))
    with job_run(named, "rollout"):
        record_gate(report["checks"])

    data = summary.refresh(named)
    client = MlflowClient()
    parent = client.get_run(pipeline_run_id(named))
    runs = children(named)
    assert [(g["job"], g["verdict"]) for g in data["gates"]] == [("evaluate", "passed"), ("evaluate_quantized/fp8", "failed"),
                                                                ("rollout", "passed")]
    assert data["gates"][2]["check"] == "canary checks passed" and data["gates"][2]["value"] == "2/2", "one row; in full under Rollout"
    assert data["gate"] == "skipped", "select has not run"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "summary")} == {"summary/summary.html", "summary/summary.md"}
    html = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="summary/summary.html")).read_text()
    for text in ("accuracy loss &lt;= quantize.max_accuracy_loss.fp8", "0.062", "0.040", "canary error rate", "0 of 50 requests",
                 "TLSv1.3", '<span class="alias">candidate</span>', "int4_awq"):
        assert text in html, text
    note = parent.data.tags[NOTE_TAG]
    assert "| evaluate | accuracy >= evaluate.gate.min_accuracy | 0.812 | 0.500 | passed |" in note
    assert "| evaluate_quantized/fp8 | accuracy loss <= quantize.max_accuracy_loss.fp8 | 0.062 | 0.040 | failed |" in note
    assert "- version 1 — **candidate**: int4_awq" in note and "| canary error rate | 0.000 | 0.010 | passed |" in note
    experiment = parent.info.experiment_id
    assert "| TLS 1.3 only | TLSv1.3 | TLSv1.3 | passed |" in note
    for name in ("evaluate", "evaluate_quantized/fp8", "register", "rollout"):
        assert f"[{name}](#/experiments/{experiment}/runs/{runs[name].info.run_id})" in note
        assert f'href="#/experiments/{experiment}/runs/{runs[name].info.run_id}"' in html
    assert parent.data.tags["ft2prod.gate"] == "skipped" and parent.data.tags["ft2prod.package.sha256"] == "ab" * 32

    report["passed"] = False
    (results / "rollout" / "report.json").write_text(json.dumps(report))
    assert summary.refresh(named)["gate"] == "failed", "a failed rollout fails the pipeline"


def test_jobs_leave_the_summary_to_the_workflow_and_a_broken_summary_only_warns(named, caplog):
    with job_run(named, "evaluate_base"):
        pass
    parent = pipeline_run_id(named)
    assert "[evaluate_base](#/experiments/" not in MlflowClient().get_run(parent).data.tags[NOTE_TAG], "jobs do not refresh it"
    summary.refresh_quietly(named)  # what the Snakefile's onsuccess/onerror handlers call
    assert "[evaluate_base](#/experiments/" in MlflowClient().get_run(parent).data.tags[NOTE_TAG]
    (Path(named.results_dir) / "select").mkdir()
    (Path(named.results_dir) / "select" / "selection.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        summary.refresh_quietly(named)
    assert re.search(r"the pipeline summary was not refreshed: JSONDecodeError", caplog.text)
    with pytest.raises(json.JSONDecodeError):
        summary.refresh(named)


def test_dag_picture_says_so_when_graphviz_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` here
    summary.draw_dag("Snakefile", tmp_path / "config.yaml", tmp_path / "dag.svg")
    assert "graphviz `dot` is not installed" in (tmp_path / "dag.svg").read_text()


def test_long_descriptions_are_cut_to_what_mlflow_accepts(named):
    with job_run(named, "select"):
        describe("\n".join(f"| row {i} | {'x' * 50} |" for i in range(400)))
    note = children(named)["select"].data.tags[NOTE_TAG]
    assert len(note) <= 7900 and note.endswith("… (cut: see the run's artifacts)")


def test_the_parent_run_carries_the_headline_for_the_runs_table(named):
    data = {"evaluation": {"metrics": {"accuracy": 0.8, "perplexity": 1.5, "gain_over_base": 0.7, "format_adherence": 1.0},
                           "base": {"accuracy": 0.1, "perplexity": 9.0}},
            "selection": {"selected": "int4_awq", "evidence": [{"scheme": "bf16", "output_tokens_per_s": 10.0, "latency_p95_s": 2.0},
                                                               {"scheme": "int4_awq", "output_tokens_per_s": 30.0, "latency_p95_s": 0.5,
                                                                "engine_mean_kl": 0.02, "engine_agreement": 0.97}]},
            "summary": {"selected": "int4_awq", "package_sha256": "ab" * 32}, "base_model": named.base_model}
    parent_id = pipeline_run_id(named)
    summary.log_headline(MlflowClient(), parent_id, data)
    summary.log_headline(MlflowClient(), parent_id, data | {"summary": {"selected": "bf16", "package_sha256": None}})  # a rerun
    parent = MlflowClient().get_run(parent_id)
    assert parent.data.metrics == {"finetuned_accuracy": 0.8, "finetuned_perplexity": 1.5, "base_accuracy": 0.1,
                                   "base_perplexity": 9.0, "gain_over_base": 0.7, "selected_output_tokens_per_s": 30.0,
                                   "selected_latency_p95_s": 0.5, "selected_engine_mean_kl": 0.02, "selected_engine_agreement": 0.97}
    assert parent.data.params == {"selected_scheme": "int4_awq", "package_sha256": "ab" * 32, "base_model": named.base_model}
    experiment = MlflowClient().get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
