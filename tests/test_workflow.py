"""End-to-end: the real Snakemake DAG on tiny configs in temporary directories, then a look at what it made."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, TINY, ZERO2, copy_of, jobs_planned, merge
from mlflow.tracking import MlflowClient

from workflow import schemes
from workflow.stages import STAGES
from workflow.wait import wait_for

pytestmark = pytest.mark.e2e

SCHEMES = tuple(schemes.SCHEMES)
ENGINES = tuple(s for s in SCHEMES if schemes.buildable(s, "onnxruntime", "cpu"))  # ONNX Runtime GenAI has no FP8 kernels
SMALLEST = min(SCHEMES, key=lambda s: schemes.SCHEMES[s].weight_bytes)
# The child runs a default run makes: every tracked stage of the stage table, per scheme where it runs per scheme
# (the engine stages only for the schemes the backend builds).
JOBS = {stage.name for stage in STAGES if stage.tracked and not stage.per_scheme} | {
    f"{stage.name}/{scheme}" for stage in STAGES if stage.tracked and stage.per_scheme
    for scheme in (ENGINES if stage.rules in ("engine", "benchmark") else SCHEMES)}


def client(workdir) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir}/results/mlflow.db")


def test_dag_exports_a_self_describing_model(zero2):
    model = zero2 / "results" / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "ft2prod.json"):
        assert (model / name).is_file(), name
    described = json.loads((model / "ft2prod.json").read_text())
    assert described["global_step"] == ZERO2["finetune"]["max_steps"] and described["finetune"]["zero_stage"] == 2
    assert "| base |" in (zero2 / "results" / "evaluate" / "report.md").read_text()


def test_fine_tuning_beats_the_base_model_on_the_test_split(zero2):
    """Learning works: lower perplexity on the reference answers and more exact answers than the base model, and
    the evaluate gate (on in ZERO2) passed. A broken loss mask or data pipeline fails here, not only "weights changed"."""
    evaluated = json.loads((zero2 / "results" / "evaluate" / "finetuned.json").read_text())
    tuned, base, gate = evaluated["metrics"], evaluated["base"], ZERO2["evaluate"]["gate"]
    numbers = f"base -> fine-tuned: accuracy {base['accuracy']:.3f} -> {tuned['accuracy']:.3f}, perplexity {base['perplexity']:.2f} -> {tuned['perplexity']:.2f}"
    assert tuned["samples"] == base["samples"] == ZERO2["evaluate"]["max_samples"], numbers
    assert tuned["perplexity"] < base["perplexity"], numbers
    assert tuned["accuracy"] > base["accuracy"], numbers
    assert tuned["accuracy"] >= gate["min_accuracy"] and tuned["accuracy"] - base["accuracy"] >= gate["min_gain"] > 0, numbers
    assert evaluated["gate"] == "passed"


def test_mlflow_has_parent_children_metrics_and_artifacts(zero2):
    mlflow = client(zero2)
    experiment = mlflow.get_experiment_by_name("ft2prod")
    runs = mlflow.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("ft2prod.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.run_name.startswith("tiny · bootstrap · 20")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == JOBS
    assert all(r.info.status == "FINISHED" for r in children.values())

    finetune = children["finetune"]
    assert finetune.data.params["finetune.zero_stage"] == "2"
    losses = mlflow.get_metric_history(finetune.info.run_id, "loss")
    assert len(losses) >= 3 and all(m.value > 0 for m in losses)
    assert mlflow.get_metric_history(finetune.info.run_id, "tokens_per_second")
    assert {"loss.png", "job.json", "finetune.log"} <= {a.path for a in mlflow.list_artifacts(finetune.info.run_id)}

    evaluate = children["evaluate"]
    assert {"accuracy", "format_adherence", "perplexity", "base_accuracy", "gain_over_base"} <= set(evaluate.data.metrics)
    assert evaluate.data.tags["ft2prod.gate"] == "passed"
    assert {"report.md", "finetuned_generations.json", "finetuned_samples.md"} <= {a.path for a in mlflow.list_artifacts(evaluate.info.run_id)}

    export = children["export"]
    assert len(export.data.tags["ft2prod.model.sha256"]) == 64
    assert {"model/config.json", "model/ft2prod.json"} <= {a.path for a in mlflow.list_artifacts(export.info.run_id, "model")}
    assert "model.sha256.json" in {a.path for a in mlflow.list_artifacts(export.info.run_id)}

    prepare = children["prepare_data"]
    contexts = {d.dataset.name: d.tags[0].value for d in prepare.inputs.dataset_inputs}
    assert contexts == {"source": "raw", "train": "training", "val": "validation", "test": "testing"}


def test_schemes_are_quantized_built_benchmarked_and_one_selected(zero2):
    results = zero2 / "results"
    records = {s: json.loads((results / "quantize" / s / "quantize.json").read_text()) for s in SCHEMES}
    assert {s: r["recipe"]["quant_algo"] for s, r in records.items()} == {s: schemes.SCHEMES[s].quant_algo for s in SCHEMES}
    baseline = records[schemes.BASELINE]
    assert records[SMALLEST]["calib_samples"] == 4 and records[SMALLEST]["checkpoint_bytes"] < baseline["checkpoint_bytes"]
    for scheme in ENGINES:
        manifest = json.loads((results / "engine" / "onnxruntime" / scheme / "engine_manifest.json").read_text())
        assert manifest["scheme"] == scheme and manifest["target"]["backend"] == "onnxruntime"
        levels = json.loads((results / "benchmark" / "onnxruntime" / f"{scheme}.json").read_text())["levels"]
        assert [lv["concurrency"] for lv in levels] == [1, 2] and all(lv["output_tokens_per_request"] == 8 for lv in levels)
        assert all(len(lv["output_tokens_per_s_runs"]) == 3 and lv["output_tokens_per_s_spread"] >= 0 for lv in levels)
        if schemes.SCHEMES[scheme].calibration:  # the quantize -> engine edge carries the calibration: both builds measured, one kept
            choice = json.loads((results / "engine" / "onnxruntime" / scheme / "accuracy.json").read_text())["calibration_choice"]
            assert set(choice["candidates"]) == {"calibrated", "rtn"} and choice["kept"] in choice["candidates"]
            assert manifest["algorithm"] == choice["candidates"][choice["kept"]]["algorithm"]
            if choice["kept"] == "calibrated":
                assert manifest["calibration"]["calib_sha256"] == records[scheme]["calib_sha256"]
    for scheme in SCHEMES:  # closeness to the fine-tuned model, measured on the test split's answers for every scheme
        q = json.loads((results / "evaluate_quantized" / f"{scheme}.json").read_text())
        assert q["closeness_tokens"] > 0 and 0 <= q["next_token_agreement"] <= 1 and q["mean_kl"] >= 0 and q["perplexity_ratio"] > 0
    selection = json.loads((results / "select" / "selection.json").read_text())
    assert all(r["engine_mean_kl"] is not None for r in selection["evidence"] if r["scheme"] in ENGINES)
    assert selection["selected"] in ENGINES and selection["policy"] == "max_throughput"
    assert selection["reason"].startswith(("highest throughput", "throughput tie within the benchmark's measured spread"))
    verdicts = {r["scheme"]: r["verdict"] for r in selection["evidence"]}
    assert all(verdicts[s] == f"no onnxruntime engine for {s}" for s in SCHEMES if s not in ENGINES)
    report = (results / "select" / "report.md").read_text()
    assert f"# Scheme selection: **{selection['selected']}**" in report and f"| {SMALLEST} |" in report
    select_run = client(zero2).search_runs([client(zero2).get_experiment_by_name("ft2prod").experiment_id],
                                           filter_string="attributes.run_name = 'select'")[0]
    artifacts = {a.path for a in client(zero2).list_artifacts(select_run.info.run_id)}
    assert {"comparison.json", "report.md", "accuracy_vs_throughput.png", "selection.json"} <= artifacts


def test_selected_engine_is_packaged_registered_backed_up_and_loads_from_the_package(zero2):
    from workflow.engine.onnxruntime import OrtEngine
    from workflow.engine.interface import GenerationRequest
    from workflow.package import archive
    from workflow.package.kms import LocalKeyFile

    results = zero2 / "results"
    registered = json.loads((results / "package" / "registered.json").read_text())
    selection = json.loads((results / "select" / "selection.json").read_text())
    package = results / "package" / "model.ftpkg"
    assert registered["alias"] == "candidate" and registered["scheme"] == selection["selected"]
    assert registered["package_sha256"] == archive.digest(package)
    version = client(zero2).get_model_version_by_alias("ft2prod-model", "candidate")
    assert version.tags["package_sha256"] == registered["package_sha256"] and version.tags["signer"].startswith("ed25519:")
    backup = json.loads((results / "package" / "backup.json").read_text())
    assert (zero2 / "backups" / registered["package_sha256"] / "manifest.sig").exists() and backup["package_sha256"] == registered["package_sha256"]

    statement = json.loads((package / "attestation.json").read_text())
    predicate = statement["predicate"]
    assert set(predicate) == {"base_model", "datasets", "calibration", "code_commit", "config_sha256", "gates", "engine_manifest", "mlflow"}
    assert predicate["gates"]["selection"]["selected"] == selection["selected"] and "finetune" in predicate["mlflow"]["runs"]

    signer = archive.load_signing_key(zero2 / "keys" / "signing.pem", create=False).public_key()
    kms = LocalKeyFile(str(zero2 / "keys" / "kek.bin"), create=False)
    shm = Path("/dev/shm") / f"ft2prod-e2e-{os.getpid()}"
    try:
        engine = OrtEngine(archive.open_package(package, signer, kms, into=shm))
        assert len(list(engine.stream(GenerationRequest([5, 6, 7, 8], 4, min_new_tokens=4)))) == 4
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@pytest.mark.services  # graphviz draws the DAG picture
def test_review_summary_dag_report_descriptions_and_registry(zero2):
    results, mlflow = zero2 / "results", client(zero2)
    experiment = mlflow.get_experiment_by_name("ft2prod")
    runs = mlflow.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("ft2prod.stage") == "pipeline")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    dag = (results / "summary" / "dag.svg").read_text()
    assert dag.lstrip().startswith("<?xml") and all(f">{job}<" in dag for job in ("finetune", "select", "register", "summary"))
    assert "<html" in (results / "summary" / "snakemake-report.html").read_text()[:2000].lower()
    html = (results / "summary" / "summary.html").read_text()
    selection = json.loads((results / "select" / "selection.json").read_text())
    for text in ("Pipeline gate: <span class=\"passed\"", f"selected <b>{selection['selected']}</b>", "<svg", "data:image/png;base64,",
                 f"accuracy loss &lt;= quantize.max_accuracy_loss.{SMALLEST}", "p95 latency &lt;= select.latency_slo_p95_s",
                 '<span class="alias">production</span><span class="alias">candidate</span>', "<h2>Rollout</h2>",
                 '<td>role_matrix</td>', f"#/experiments/{experiment.experiment_id}/runs/{children['finetune'].info.run_id}"):
        assert text in html, text
    assert {"summary/summary.html", "summary/summary.md", "summary/dag.svg", "summary/snakemake-report.html"} <= {
        a.path for a in mlflow.list_artifacts(parent.info.run_id, "summary")}
    assert parent.data.tags["ft2prod.gate"] == "passed" and parent.data.tags["ft2prod.selected_scheme"] == selection["selected"]
    assert f"[register](#/experiments/{experiment.experiment_id}/runs/{children['register'].info.run_id})" in parent.data.tags["mlflow.note.content"]
    gates = {name: run.data.tags["ft2prod.gate"] for name, run in children.items()}
    assert gates["evaluate"] == gates["select"] == gates["rollout"] == "passed" and gates["finetune"] == gates["package"] == "none"
    for name, run in children.items():
        assert run.data.tags["mlflow.note.content"].startswith(f"**{name.split('/')[0]}**"), name
    assert "final train loss **" in children["finetune"].data.tags["mlflow.note.content"]
    assert "output tokens/s" in children[f"benchmark/{SMALLEST}"].data.tags["mlflow.note.content"]
    version = mlflow.get_model_version_by_alias("ft2prod-model", "candidate")
    assert version.tags["scheme"] == selection["selected"] and version.tags["pipeline_run_id"] == parent.info.run_id
    assert "- quantization gate: " in version.description and version.tags["package_sha256"] in version.description
    assert "`production`" in mlflow.get_registered_model("ft2prod-model").description


def test_rollout_passes_its_canary_and_promotes_to_production(zero2):
    from workflow.serve.audit import AuditLog

    results = zero2 / "results"
    report = json.loads((results / "rollout" / "report.json").read_text())
    registered = json.loads((results / "package" / "registered.json").read_text())
    assert report["passed"] and report["version"] == registered["version"]
    assert [c["name"] for c in report["checks"]] == ["tls", "role_matrix", "generation", "latency", "audit"]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["tls"]["value"]["negotiated"] == "TLSv1.3" and checks["tls"]["value"]["tls1.2_client"].startswith("refused")
    assert checks["generation"]["value"]["equal"] == TINY["rollout"]["canary"]["samples"]
    key = (zero2 / "keys" / "audit.key").read_bytes()  # the gateway made it on first use, owner-only, off the audit log
    assert checks["audit"]["value"]["head"] == AuditLog(results / "rollout" / "canary-audit.jsonl", key).verify()["head"]
    promoted = json.loads((results / "rollout" / "promoted.json").read_text())
    production = client(zero2).get_model_version_by_alias("ft2prod-model", "production")
    assert promoted["production"] == str(production.version) == str(registered["version"])
    assert production.tags["ft2prod.rollout.package_sha256"] == registered["package_sha256"]


def test_failed_canary_keeps_production_then_promotion_and_rollback_move_it(zero2, tmp_path, snakemake):
    work = copy_of(zero2, tmp_path / "copy")
    repackaged = merge(ZERO2, {"package": {"chunk_mb": 1}})
    failed = snakemake(work, merge(repackaged, {"rollout": {"canary": {"latency_p95_s": 1e-6}}}), check=False)
    assert failed.returncode != 0
    assert "rollout: canary failed, production not changed: latency: p95" in (work / "results" / "logs" / "rollout.log").read_text()
    mlflow = client(work)
    first = str(mlflow.get_model_version_by_alias("ft2prod-model", "production").version)
    second = str(mlflow.get_model_version_by_alias("ft2prod-model", "candidate").version)
    assert first != second  # the new package is the candidate; production stays on the one promoted before
    assert json.loads((work / "results" / "rollout" / "promoted.json").read_text())["production"] == first
    assert not json.loads((work / "results" / "rollout" / "failed-report.json").read_text())["passed"]

    snakemake(work, repackaged)
    assert str(mlflow.get_model_version_by_alias("ft2prod-model", "production").version) == second
    assert str(mlflow.get_model_version_by_alias("ft2prod-model", "previous").version) == first

    serve = [sys.executable, "-m", "workflow.serve", "--config", "config.yaml"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the copy's own store, as snakemake() does
    admin = subprocess.run([*serve, "keys", "add", "--id", "ops", "--role", "admin"], cwd=work, capture_output=True, text=True, check=True)
    port = 18000 + os.getpid() % 1000
    # The gateway served the first package, then was updated to the second; the rollback undoes that update.
    digests = [mlflow.get_model_version("ft2prod-model", v).tags["package_sha256"] for v in (first, second)]
    gateway = subprocess.Popen([*serve, "start", "--package", f"backups/{digests[0]}", "--port", str(port)], cwd=work,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env["FT2PROD_ADMIN_KEY"] = admin.stdout.strip()
        url = f"https://127.0.0.1:{port}"
        curl = ["curl", "-sf", "--cacert", "keys/tls/ca.pem", "-H", f"Authorization: Bearer {admin.stdout.strip()}"]

        def serving(digest: str) -> bool:
            answer = subprocess.run([*curl, f"{url}/v1/deployment"], cwd=work, capture_output=True, text=True)
            return answer.returncode == 0 and json.loads(answer.stdout)["package"].get("sha256") == digest

        wait_for(lambda: serving(digests[0]), "the gateway to serve the first package", 120, every=0.5)
        subprocess.run([*curl, "-X", "POST", "-H", "content-type: application/json", "-d", json.dumps({"package_sha256": digests[1]}),
                        f"{url}/admin/deploy"], cwd=work, check=True, capture_output=True)
        wait_for(lambda: serving(digests[1]), "the gateway to serve the second package", 120, every=0.5)
        back = subprocess.run([sys.executable, "-m", "workflow.rollout", "--config", "config.yaml", "rollback", "--gateway", url],
                              cwd=work, env=env, capture_output=True, text=True)
        assert back.returncode == 0, back.stderr
        record = json.loads(back.stdout)
        assert record["production"] == first and record["rolled_back"] == second
        served = subprocess.run(["curl", "-sf", "--cacert", "keys/tls/ca.pem", "-H", f"Authorization: Bearer {admin.stdout.strip()}",
                                 f"{url}/v1/deployment"], cwd=work, capture_output=True, text=True, check=True)
        assert json.loads(served.stdout)["package"]["sha256"] == record["package_sha256"]
        assert mlflow.get_model_version(f"ft2prod-model", first).tags["package_sha256"] == record["package_sha256"]
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)
    assert str(mlflow.get_model_version_by_alias("ft2prod-model", "production").version) == first
    again = subprocess.run([sys.executable, "-m", "workflow.rollout", "--config", "config.yaml", "rollback"], cwd=work,
                           env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "no version with alias 'previous'" in again.stderr


def test_kubernetes_target_renders_and_validates_manifests_without_promoting(zero2, tmp_path, snakemake):
    work = copy_of(zero2, tmp_path / "k8s")
    pinned = {"image": "registry.internal/ft2prod/gateway:0.1.0@sha256:" + "1" * 64}  # rendering refuses an image by tag
    settings = merge(ZERO2, {"rollout": {"target": "kubernetes", "kubernetes": pinned}})
    planned = jobs_planned(snakemake(work, settings, "-n"))
    assert planned == {"rollout", "summary", "all"}  # no context to apply to: nothing is promoted
    snakemake(work, settings)
    report = json.loads((work / "results" / "rollout" / "report.json").read_text())
    assert report["passed"] and report["target"] == "kubernetes" and not report["applied"]
    assert report["checks"][0]["name"] == "manifests" and "Deployment/ft2prod-gateway" in report["checks"][0]["value"]
    assert (work / "results" / "rollout" / "k8s" / "kustomization.yaml").exists()


def windows(path: Path, count: int = 8, size: int = 64) -> list[bytes]:
    data = path.read_bytes()
    step = max(1, (len(data) - size) // count)
    return [data[i : i + size] for i in range(step // 2, len(data) - size, step)][:count]


def test_no_plaintext_weights_or_keys_in_results_package_or_mlflow(zero2):
    results = zero2 / "results"
    weights = [results / "model" / "model.safetensors"] + list((results / "engine").rglob("model.onnx.data"))
    needles = [w for path in weights for w in windows(path)]
    signing = (zero2 / "keys" / "signing.pem").read_bytes()
    keys = [(zero2 / "keys" / "kek.bin").read_bytes(), signing, signing.split(b"-----")[2].strip()]
    shipped = [results / "mlflow.db", *(results / "mlartifacts").rglob("*"), *(results / "package").rglob("*"), *(zero2 / "backups").rglob("*")]
    scanned = 0
    for path in shipped:
        if path.is_file():
            data = path.read_bytes()
            scanned += 1
            assert not any(n in data for n in needles), f"plaintext weights in {path}"
    assert scanned > 20
    for path in results.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(k in data for k in keys), f"key material in {path}"


def test_a_copy_of_the_finished_dag_has_nothing_to_do(zero2, tmp_path, snakemake):
    work = copy_of(zero2, tmp_path / "copy")
    done = snakemake(work, ZERO2, "-n")
    assert "Nothing to be done" in done.stdout + done.stderr


def test_config_change_reruns_only_what_it_affects(zero2, tmp_path, snakemake):
    work = copy_of(zero2, tmp_path / "copy")  # a dry run still writes config.yaml
    upstream = {"bootstrap", "generate_data", "prepare_data"}
    load = snakemake(work, merge(ZERO2, {"benchmark": {"requests": 3}}), "-n")
    assert jobs_planned(load) == {"benchmark_onnxruntime", "select", "package", "register", "backup", "rollout", "promote", "summary", "all"}
    evaluation = snakemake(work, merge(ZERO2, {"evaluate": {"max_new_tokens": 40}}), "-n")
    assert {"evaluate_base", "evaluate", "evaluate_quantized"} <= jobs_planned(evaluation)
    assert not (upstream | {"finetune", "export", "quantize"}) & jobs_planned(evaluation)
    training = snakemake(work, merge(ZERO2, {"finetune": {"learning_rate": ZERO2["finetune"]["learning_rate"] / 2}}), "-n")
    assert {"finetune", "export", "evaluate", "quantize"} <= jobs_planned(training)
    assert not (upstream | {"evaluate_base"}) & jobs_planned(training)
    # a re-plan that still fits reruns the plan rule only: no stage waits for it
    replanned = snakemake(work, merge(ZERO2, {"cluster": {"overhead_gib": 1.5}}), "-n")
    assert "plan" in jobs_planned(replanned) and jobs_planned(replanned) <= {"plan", "all"}



def test_failed_gate_stops_the_dag_and_says_why(zero2, tmp_path, snakemake):
    work = copy_of(zero2, tmp_path / "copy")
    done = snakemake(work, merge(ZERO2, {"evaluate": {"gate": {"min_accuracy": 0.99}}}), check=False)
    assert done.returncode != 0
    assert re.search(r"evaluate gate failed: exact accuracy \d\.\d{3} < evaluate\.gate\.min_accuracy 0\.990", done.stdout + done.stderr)
    runs = client(work).search_runs(
        [client(work).get_experiment_by_name("ft2prod").experiment_id], filter_string="attributes.run_name = 'evaluate'"
    )
    assert {r.data.tags.get("ft2prod.gate") for r in runs} == {"passed", "failed"}
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1, "a rerun attaches to the same pipeline run"


@pytest.mark.parametrize("settings", [{"zero_stage": 3}, {"method": "lora", "zero_stage": 2}], ids=["zero3", "lora"])
def test_finetune_variants_run_end_to_end(tmp_path, settings, tiny_base, snakemake):
    """Through the exported model, from the session's tiny base model (the bootstrap stage runs in the whole DAG)."""
    snakemake(tmp_path, {"base_model": str(tiny_base), "finetune": settings}, "results/model")
    described = json.loads((tmp_path / "results" / "model" / "ft2prod.json").read_text())
    assert {k: described["finetune"][k] for k in settings} == settings
    base = (tiny_base / "model.safetensors").read_bytes()
    assert (tmp_path / "results" / "model" / "model.safetensors").read_bytes() != base, "training changed the weights"
    log = (tmp_path / "results" / "logs" / "finetune.log").read_text()
    assert f"'stage': {settings['zero_stage']}" in log or f'"zero_stage": {settings["zero_stage"]}' in log
    # The GPU-only speed settings are skipped on this CPU, said in the log, and recorded as resolved in MLflow.
    assert "skipped liger_kernel: Liger's Triton kernels need a CUDA GPU" in log
    mlflow_client = client(tmp_path)
    [run] = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("ft2prod").experiment_id],
                                      filter_string="attributes.run_name = 'finetune'")
    assert run.data.params["finetune.liger_kernel"] == "True"
    assert (run.data.params["resolved.liger_kernel"], run.data.params["resolved.attention"]) == ("False", "sdpa")


def test_bad_dataset_row_stops_prepare_data_naming_file_and_line(tmp_path, tiny_base, snakemake):
    bad = tmp_path / "bad.jsonl"
    good = {"instruction": "Add 2 and 3", "output": "5"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"messages": [{"role": "user"}]}\n')
    done = snakemake(tmp_path, {"base_model": str(tiny_base), "data": {"path": str(bad)}}, "results/data/stats.json", check=False)
    assert done.returncode != 0
    assert f"{bad}:3: messages[0].content must be a string" in done.stdout + done.stderr


def test_killed_finetune_resumes_from_its_last_checkpoint(tmp_path, tiny_base, snakemake):
    settings = {"base_model": str(tiny_base), "finetune": {"max_steps": 40, "save_steps": 5}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(merge(TINY, settings)))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml", "--cores", "2",
               "results/finetune/summary.json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "results" / "finetune" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("checkpoint-1[05]/.complete")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    ranks = [p for p in psutil.process_iter(["cmdline", "cwd"]) if p.info["cwd"] == str(tmp_path) and "workflow.finetune.train" in (p.info["cmdline"] or [])]
    assert len(ranks) >= 2, "both training ranks were running"
    for rank in ranks:
        rank.send_signal(signal.SIGKILL)  # kill -9 of the fine-tune, midway
    assert first.wait(timeout=120) != 0
    assert not (tmp_path / "results" / "finetune" / "summary.json").exists(), "killed before it finished"
    killed_at = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if (p / ".complete").exists())
    assert 5 <= killed_at < 40

    snakemake(tmp_path, settings, "results/finetune/summary.json")
    summary = json.loads((tmp_path / "results" / "finetune" / "summary.json").read_text())
    assert summary["global_step"] == 40
    assert summary["resumed_from"].endswith(f"checkpoint-{killed_at}")
    assert f"resuming from {checkpoints}/checkpoint-{killed_at}" in (tmp_path / "results" / "logs" / "finetune.log").read_text()
