"""The pipeline summary on the parent run: what a reviewer reads in the MLflow UI, refreshed when a run of the workflow ends.

    snakemake results/summary/summary.html                  # the summary rule: DAG picture, Snakemake report, summary
    python -m workflow.summary --results results             # refresh by hand (after a promotion, say)

`refresh(tracking)` gathers what the pipeline has made so far (the latest run of each job, every gate's value
vs threshold, the scheme comparison and its plot, the package digest and signer, the registered versions and
their aliases, the rollout checks, the DAG picture) and logs `summary/summary.html` (self-contained: pictures
inlined) and `summary/summary.md` on the parent run, whose description becomes the Markdown summary with links
to every child run. The workflow refreshes it when a run of `snakemake` ends (the Snakefile's onsuccess and
onerror handlers), quietly: a summary that cannot be made is a warning there, never a failed run. The summary
rule calls it strictly, after drawing the DAG and writing the Snakemake report.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import jinja2
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from workflow.config import Config, settings
from workflow.stages import STAGES
from workflow.tracking import GATE_TAG, Tracking, pipeline_run_id, set_note

log = logging.getLogger(__name__)

ORDER = ["pipeline", *(stage.name for stage in STAGES), "rollback"]  # DAG order, for tables
BLOCKING = [stage.name for stage in STAGES if stage.blocking]  # a failed scheme gate only drops the scheme
ALIASES = ("production", "candidate", "previous")
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=jinja2.select_autoescape(["html.j2"]),
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def data_uri(path: Path) -> str | None:
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" if path.is_file() else None


def inline_svg(path: Path) -> str | None:
    """An SVG file as markup to put inside HTML (its XML prologue and doctype dropped)."""
    if not path.is_file():
        return None
    return re.sub(r"^.*?(?=<svg)", "", path.read_text(), count=1, flags=re.S)


def ui_base(tracking: Tracking) -> str:
    """Links to runs: absolute under an HTTP tracking server (which is the UI), else relative to the UI page."""
    uri = tracking.resolved_uri()
    return uri.rstrip("/") + "/" if uri.startswith(("http://", "https://")) else ""


def stage_key(run) -> tuple:
    stage = run.data.tags.get("ft2prod.stage", "")
    return (ORDER.index(stage) if stage in ORDER else len(ORDER), run.info.run_name)


def latest_children(client: MlflowClient, experiment_id: str, parent_id: str) -> tuple[list, dict[str, int]]:
    """The latest run of each job (a job rerun after a failure has several), in DAG order; and attempts per job."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    latest, attempts = {}, {}
    for run in runs:
        latest[run.info.run_name] = run
        attempts[run.info.run_name] = attempts.get(run.info.run_name, 0) + 1
    return sorted(latest.values(), key=stage_key), attempts


def artifact_json(client: MlflowClient, run, name: str) -> dict | None:
    if name not in {a.path for a in client.list_artifacts(run.info.run_id)}:
        return None
    if run.info.artifact_uri.startswith("file:"):  # read in place (a download prints a progress bar per file)
        return json.loads((Path(urlparse(run.info.artifact_uri).path) / name).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run.info.run_id, name, tmp)).read_text())


def gate_rows(client: MlflowClient, runs: list) -> list[dict]:
    """Every check of every gated job: job, check, value, threshold, verdict, detail. The rollout's checks are one
    row here (the summary shows them in full under Rollout)."""
    rows = []
    for run in runs:
        verdict = run.data.tags.get(GATE_TAG)
        gate = artifact_json(client, run, "gate.json") if verdict in ("passed", "failed") else None
        if gate is None and "ft2prod.gate_reason" not in run.data.tags:
            continue  # no gate of its own (promote tags itself passed)
        checks = gate["checks"] if gate else [{"name": "gate", "passed": verdict == "passed", "value": None, "threshold": None,
                                                "detail": run.data.tags["ft2prod.gate_reason"]}]
        if run.data.tags.get("ft2prod.stage") == "rollout":
            passed = sum(bool(c["passed"]) for c in checks)
            checks = [{"name": "canary checks passed", "passed": passed == len(checks), "value": f"{passed}/{len(checks)}",
                       "threshold": "all", "detail": "; ".join(f"{c['name']}: {c.get('detail', '')}" for c in checks)}]
        for check in checks:
            rows.append({"job": run.info.run_name, "run_id": run.info.run_id, "check": check["name"],
                         "value": check.get("value"), "threshold": check.get("threshold"),
                         "verdict": "passed" if check["passed"] else "failed", "detail": check.get("detail", "")})
    return rows


def overall_gate(runs: list, rollout: dict | None) -> str:
    """failed when a blocking gate failed; passed once select (and rollout, if it ran) passed; else skipped."""
    verdicts = {run.data.tags.get("ft2prod.stage"): run.data.tags.get(GATE_TAG) for run in runs}
    if rollout is not None:
        verdicts["rollout"] = "passed" if rollout.get("passed") else "failed"
    if any(verdicts.get(stage) == "failed" for stage in BLOCKING):
        return "failed"
    return "passed" if verdicts.get("select") == "passed" else "skipped"


def rollout_report(results: Path) -> dict | None:
    """The newest rollout report: report.json when the canary passed, failed-report.json when it did not."""
    found = [p for p in (results / "rollout" / "report.json", results / "rollout" / "failed-report.json") if p.is_file()]
    return read_json(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def alias_order(alias: str) -> tuple:
    return (ALIASES.index(alias) if alias in ALIASES else len(ALIASES), alias)


def registry(client: MlflowClient, model_name: str | None) -> list[dict]:
    """The registered versions of the pipeline's model, newest first, with their aliases."""
    if not model_name:
        return []
    try:
        found = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return []
    # search_model_versions leaves aliases out; get_model_version has them.
    versions = [client.get_model_version(model_name, v.version) for v in found]
    return [{"name": model_name, "version": v.version, "aliases": sorted(v.aliases, key=alias_order),
             "scheme": v.tags.get("scheme", ""), "package_sha256": v.tags.get("package_sha256", ""),
             "run_id": v.run_id, "status": v.status, "created": datetime.fromtimestamp(v.creation_timestamp / 1000, UTC)}
            for v in sorted(versions, key=lambda v: -int(v.version))]


def run_row(run, attempts: dict[str, int], base: str) -> dict:
    info = run.info
    seconds = (info.end_time - info.start_time) / 1000 if info.end_time else None
    return {"job": info.run_name, "run_id": info.run_id, "status": info.status, "gate": run.data.tags.get(GATE_TAG, ""),
            "seconds": seconds, "attempts": attempts[info.run_name],
            "url": f"{base}#/experiments/{info.experiment_id}/runs/{info.run_id}"}


def collect(tracking: Tracking, results_dir: str | Path) -> dict:
    """Everything the summary shows, from the results directory and the MLflow store."""
    results = Path(results_dir)
    client = MlflowClient()
    parent = client.get_run(pipeline_run_id(tracking))
    experiment_id = parent.info.experiment_id
    runs, attempts = latest_children(client, experiment_id, parent.info.run_id)
    by_job = {run.info.run_name: run for run in runs}
    base = ui_base(tracking)
    registered = read_json(results / "package" / "registered.json")
    rollout = rollout_report(results)
    package_run = by_job.get("package")
    data = {
        "title": parent.info.run_name,
        "run_name": tracking.run_name,
        "base_model": parent.data.tags.get("ft2prod.base_model", tracking.base_model),
        "results_dir": str(results.resolve()),
        "git_commit": parent.data.tags.get("ft2prod.git_commit", ""),
        "updated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "status": parent.info.status,
        "gate": overall_gate(runs, rollout),
        "parent_url": f"{base}#/experiments/{experiment_id}/runs/{parent.info.run_id}",
        "runs": [run_row(run, attempts, base) for run in runs],
        "gates": gate_rows(client, runs),
        "data": read_json(results / "data" / "stats.json"),
        "training": by_job["finetune"].data.metrics if "finetune" in by_job else None,
        "evaluation": read_json(results / "evaluate" / "finetuned.json"),
        "selection": read_json(results / "select" / "selection.json"),
        "package": artifact_json(client, package_run, "package.json") if package_run else None,
        "registered": registered,
        "versions": registry(client, (registered or {}).get("model_name")),
        "rollout": rollout,
        "models_url": f"{base}#/models/{registered['model_name']}" if registered else None,
        "loss_png": data_uri(results / "finetune" / "loss.png"),
        "plot_png": data_uri(results / "select" / "accuracy_vs_throughput.png"),
        "schemes_png": data_uri(results / "select" / "schemes.png"),
        "dag_svg": inline_svg(results / "summary" / "dag.svg"),
        "report": (results / "summary" / "snakemake-report.html").is_file(),
    }
    data["summary"] = {k: data[k] for k in ("gate", "status")} | {
        "selected": (data["selection"] or {}).get("selected"), "package_sha256": (registered or {}).get("package_sha256")}
    return data


def fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, dict | list):  # a check's structured value: compact, numbers rounded
        text = json.dumps(json.loads(json.dumps(value), parse_float=lambda f: round(float(f), 4)), separators=(", ", ": "))
        return text if len(text) <= 120 else text[:117] + "…"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return format(value, spec)


TEMPLATES.filters["fmt"] = fmt


def render(data: dict) -> tuple[str, str]:
    """(HTML, Markdown) of the summary."""
    return TEMPLATES.get_template("summary.html.j2").render(**data), TEMPLATES.get_template("summary.md.j2").render(**data)


def refresh(tracking: Tracking, results_dir: str | Path | None = None) -> dict:
    """Rebuild the summary from what is in `results_dir` (default: the tracking's) and the MLflow store, and log
    it on the parent run: artifacts summary/summary.html and summary/summary.md, the run description, and the
    tags ft2prod.gate (failed / passed / skipped), ft2prod.selected_scheme and ft2prod.package.sha256.
    Returns what it showed. Safe to call from several processes at once (a file lock orders them)."""
    results = Path(results_dir or tracking.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    parent_id = pipeline_run_id(tracking)  # before the lock: it takes the store's own lock
    with open(results / ".summary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = collect(tracking, results)
        html, markdown = render(data)
        client = MlflowClient()
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in (("summary.html", html), ("summary.md", markdown)):
                (Path(tmp) / name).write_text(text)
                client.log_artifact(parent_id, str(Path(tmp) / name), "summary")
        set_note(markdown, parent_id)
        tags = {GATE_TAG: data["gate"]}
        if data["summary"]["selected"]:
            tags["ft2prod.selected_scheme"] = data["summary"]["selected"]
        if data["summary"]["package_sha256"]:
            tags["ft2prod.package.sha256"] = data["summary"]["package_sha256"]
        for key, value in tags.items():
            client.set_tag(parent_id, key, value)
        log_headline(client, parent_id, data)
        return data


def headline(data: dict) -> tuple[dict[str, float], dict[str, str]]:
    """The numbers and choices that compare pipeline runs side by side in the MLflow runs table."""
    evaluation, selection = data["evaluation"] or {}, data["selection"] or {}
    metrics = {f"finetuned_{k}": v for k, v in (evaluation.get("metrics") or {}).items() if k in ("accuracy", "perplexity")}
    metrics |= {f"base_{k}": v for k, v in (evaluation.get("base") or {}).items() if k in ("accuracy", "perplexity")}
    if "accuracy" in (evaluation.get("metrics") or {}):
        metrics["gain_over_base"] = evaluation["metrics"]["gain_over_base"]
    chosen = next((row for row in selection.get("evidence", []) if row["scheme"] == selection.get("selected")), None)
    if chosen and chosen.get("output_tokens_per_s") is not None:
        metrics |= {"selected_output_tokens_per_s": chosen["output_tokens_per_s"], "selected_latency_p95_s": chosen["latency_p95_s"]}
    if chosen:
        metrics |= {"selected_engine_mean_kl": chosen.get("engine_mean_kl"), "selected_engine_agreement": chosen.get("engine_agreement")}
    params = {"selected_scheme": data["summary"]["selected"], "package_sha256": data["summary"]["package_sha256"],
              "base_model": data["base_model"]}
    return {k: float(v) for k, v in metrics.items() if v is not None}, {k: v for k, v in params.items() if v}


def log_headline(client: MlflowClient, parent_id: str, data: dict) -> None:
    """Headline metrics and params on the parent run. Params cannot change in MLflow: one that a rerun changed (a
    new selected scheme, say) keeps its first value there, and the ft2prod.* tags hold the current one."""
    metrics, params = headline(data)
    for key, value in metrics.items():
        client.log_metric(parent_id, key, value)
    logged = client.get_run(parent_id).data.params
    for key, value in params.items():
        if key not in logged:
            client.log_param(parent_id, key, value)
        elif logged[key] != str(value):
            log.warning("parent run param %s stays %s (now %s: see the tags)", key, logged[key], value)


def refresh_quietly(tracking: Tracking) -> None:
    """refresh, for the end of a workflow run: a summary that cannot be made is a warning, not a failed run."""
    try:
        refresh(tracking)
    except Exception as err:  # noqa: BLE001 - the job's own result must stand whatever the summary hits
        log.warning("the pipeline summary was not refreshed: %s: %s", type(err).__name__, err)


def snakemake_command(snakefile: str | Path, config_file: Path, *args: str) -> list[str]:
    # --nolock: the running Snakemake (whose last job this is) holds the working directory's lock.
    return [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--configfile", str(config_file), "--nolock", *args]


def draw_dag(snakefile: str | Path, config_file: Path, out_svg: Path) -> None:
    """The job graph (`snakemake --dag`) drawn by graphviz `dot` as SVG; where `dot` is missing, an SVG that says so."""
    dot = shutil.which("dot")
    if dot is None:
        log.warning("graphviz `dot` is not on PATH: the summary has no DAG picture (apt-get install graphviz)")
        out_svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="520" height="30"><text x="4" y="20">'
                           "No DAG picture: graphviz `dot` is not installed (apt-get install graphviz)</text></svg>\n")
        return
    graph = subprocess.run(snakemake_command(snakefile, config_file, "--dag"), capture_output=True, text=True)
    if graph.returncode != 0 or "digraph" not in graph.stdout:
        raise RuntimeError(f"summary: `snakemake --dag` failed ({graph.returncode}): {graph.stderr[-2000:]}")
    dot_source = graph.stdout[graph.stdout.index("digraph"):]
    subprocess.run([dot, "-Tsvg", "-o", str(out_svg)], input=dot_source, text=True, check=True, capture_output=True)


def snakemake_report(snakefile: str | Path, config_file: Path, out_html: Path) -> None:
    done = subprocess.run(snakemake_command(snakefile, config_file, "--report", str(out_html)), capture_output=True, text=True)
    if done.returncode != 0 or not out_html.is_file():
        raise RuntimeError(f"summary: `snakemake --report` failed ({done.returncode}): {done.stderr[-2000:]}")


def summary(snakefile: str | Path, config: Config, out_html: str | Path, out_md: str | Path, dag_svg: str | Path,
          report_html: str | Path, tracking: Tracking) -> dict:
    """The summary rule: draw the DAG, write the Snakemake report, refresh the summary, and keep all four files
    in results/summary/ and on the parent run (summary/dag.svg, summary/snakemake-report.html)."""
    out_html, out_md, dag_svg, report_html = map(Path, (out_html, out_md, dag_svg, report_html))
    out_html.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config_file:
        yaml.safe_dump(config.model_dump(mode="json"), config_file, sort_keys=False)  # key order is part of the params Snakemake compares
        config_file.flush()
        draw_dag(snakefile, Path(config_file.name), dag_svg)
        snakemake_report(snakefile, Path(config_file.name), report_html)
    data = refresh(tracking)
    html, markdown = render(data)
    out_html.write_text(html)
    out_md.write_text(markdown)
    client = MlflowClient()
    parent_id = pipeline_run_id(tracking)
    for path in (dag_svg, report_html):
        client.log_artifact(parent_id, str(path), "summary")
    log.info("summary: gate %s, %d runs, %d gate checks; %s", data["gate"], len(data["runs"]), len(data["gates"]), out_html)
    return data


def merged(base: dict, override: dict) -> dict:
    return base | {k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v for k, v in override.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="the pipeline's results directory")
    parser.add_argument("--configfile", help="the config the pipeline ran with, over the embedded default")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = yaml.safe_load((Path(__file__).parent.parent / "config" / "config.yaml").read_text())
    if args.configfile:
        config = merged(config, yaml.safe_load(Path(args.configfile).read_text()) or {})
    data = refresh(Tracking.from_config(settings(config), results_dir=args.results))
    print(f"summary refreshed: gate {data['gate']}, {len(data['runs'])} runs")


if __name__ == "__main__":
    main()
