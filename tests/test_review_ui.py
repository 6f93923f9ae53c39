"""A reviewer follows a finished pipeline run in the MLflow UI, in a real browser (headless Debian Chromium).

The MLflow server runs on loopback over the store of the session's tiny DAG run (`zero2`); Chromium may reach
nothing else (host resolver rules, and every request off 127.0.0.1 aborted). Screenshots are kept under the
test's temporary folder; the path is printed (pytest -s) and given in failures.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from workflow.finetune.launch import free_port
from workflow.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.services]  # the session's DAG run; Chromium and `mlflow server`

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 60_000
TRAINING_VIEW = "?workflowType=machine_learning"  # the UI's "Model training" view (it opens on GenAI views)


def settle(page) -> None:
    """Close the assistant side panel if it is open, and give late panels a moment before a screenshot (the UI polls,
    so the network never goes idle)."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
    page.wait_for_timeout(2000)


@pytest.fixture(scope="module")
def ui(zero2, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 over the finished run's store; stopped (its whole process group) afterwards."""
    results = zero2 / "results"
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow_server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{results}/mlflow.db",
         "--default-artifact-root", (results / "mlartifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                return True
            except OSError:
                assert server.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
                return False

        wait_for(up, f"the mlflow server on {base}", 120)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_reviewer_follows_the_pipeline_run_in_the_mlflow_ui(zero2, ui, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make system` installs Debian's chromium"
    shots = tmp_path_factory.mktemp("screenshots")
    print(f"\nreview screenshots: {shots}")
    store = MlflowClient(f"sqlite:///{zero2}/results/mlflow.db")
    experiment = store.get_experiment_by_name("ft2prod")
    parent = next(r for r in store.search_runs([experiment.experiment_id]) if r.data.tags.get("ft2prod.stage") == "pipeline")
    finetune = store.search_runs([experiment.experiment_id], "attributes.run_name = 'finetune'")[0]
    candidate = store.get_model_version_by_alias("ft2prod-model", "candidate")
    blocked = []

    def loopback_only(route):
        if route.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            return route.continue_()
        blocked.append(route.request.url)
        return route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(TIMEOUT_MS)
            context.route("**/*", loopback_only)  # every tab, popups too
            page = context.new_page()

            # 1. The experiment: the pipeline run, expanded to its child runs.
            page.goto(f"{ui}/#/experiments/{experiment.experiment_id}/runs{TRAINING_VIEW}")
            row = page.locator('[role="gridcell"]', has_text=parent.info.run_name).first
            row.wait_for()
            settle(page)
            row.locator("button").first.click()  # the row's expander
            for job in ("finetune", "select", "register", "quantize/int4_awq"):
                page.get_by_role("link", name=job, exact=True).wait_for()
            page.screenshot(path=shots / "1-experiment.png")

            # 2. The pipeline run: its description is the summary, with gates and links to the child runs.
            page.get_by_role("link", name=parent.info.run_name).first.click()
            page.get_by_text("accuracy >= evaluate.gate.min_accuracy").first.wait_for()
            page.get_by_text("Child runs").first.wait_for()
            page.get_by_text("Show more").first.click()  # the whole description
            page.get_by_role("link", name="register", exact=True).first.wait_for()
            settle(page)
            page.screenshot(path=shots / "2-pipeline-run.png", full_page=True)
            with page.expect_popup() as opened:  # MLflow opens a description's links in a new tab
                page.get_by_role("link", name="finetune", exact=True).first.click()
            child = opened.value
            child.get_by_text("final train loss").first.wait_for()
            settle(child)
            assert child.url.endswith(f"#/experiments/{experiment.experiment_id}/runs/{finetune.info.run_id}")
            child.screenshot(path=shots / "3-finetune-run.png")
            child.close()

            # 3. The summary artifact on the pipeline run (MLflow shows HTML in a sandboxed frame).
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("summary", exact=True).first.click()
            page.get_by_text("snakemake-report.html", exact=True).wait_for()
            page.get_by_text("summary.html", exact=True).first.click()
            summary = page.frame_locator("iframe.mlflow-html-iframe")
            summary.get_by_text("Model registry").wait_for()
            assert summary.locator("#gates tr").count() >= 10
            assert summary.locator(".dag svg").count() == 1
            assert summary.locator("#registry .alias", has_text="candidate").count() == 1
            settle(page)
            page.screenshot(path=shots / "4-summary.png")

            # 4. The registered model: the version from this run, aliases candidate and production, its gates in the description.
            page.goto(f"{ui}/#/models/ft2prod-model{TRAINING_VIEW}")
            page.get_by_text("candidate").first.wait_for()
            settle(page)
            page.screenshot(path=shots / "5-model.png")
            page.goto(f"{ui}/#/models/ft2prod-model/versions/{candidate.version}{TRAINING_VIEW}")
            page.get_by_text("quantization gate").first.wait_for()
            settle(page)
            assert page.get_by_text(candidate.tags["package_sha256"]).count() >= 1
            for alias in ("candidate", "production"):  # the tiny run's canary passed: promoted
                page.get_by_text(re.compile(rf"^@\s*{alias}$")).first.wait_for()
            page.screenshot(path=shots / "6-model-version.png")
        except Exception as err:
            page.screenshot(path=shots / "failure.png")
            raise AssertionError(f"{err}\nscreenshots: {shots}") from err
        finally:
            browser.close()
    print(f"requests off loopback, aborted: {len(blocked)} {sorted(set(blocked))[:5]}")
    assert sorted(p.name for p in shots.glob("*.png")) == [
        "1-experiment.png", "2-pipeline-run.png", "3-finetune-run.png", "4-summary.png", "5-model.png", "6-model-version.png"]
