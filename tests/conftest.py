"""Shared fixtures: a tiny locally built base model, and a helper that runs the real Snakemake DAG."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import closing
from pathlib import Path

import pytest
import yaml

from workflow.schemes import SCHEMES

REPO = Path(__file__).resolve().parent.parent

# Small enough for a 2-core machine: the DAG runs end to end in about a minute.
TINY = {
    "run_name": "tiny",
    "bootstrap": {"num_layers": 2, "pretrain_rows": 300, "pretrain_steps": 20},
    "data": {"generated_rows": 240, "test_fraction": 0.1},
    "finetune": {"max_steps": 8, "save_steps": 4, "micro_batch_size": 8, "logging_steps": 2},
    "evaluate": {"max_samples": 8, "max_new_tokens": 48, "gate": {"min_accuracy": 0.0, "min_gain": -1.0}},
    "quantize": {"calib_samples": 4, "max_accuracy_loss": dict.fromkeys(SCHEMES, 1.0),
                 "max_kl": dict.fromkeys(SCHEMES, 100.0), "min_agreement": dict.fromkeys(SCHEMES, 0.0)},
    "benchmark": {"input_len": 24, "output_len": 8, "concurrency": [1, 2], "requests": 4},
    "rollout": {"canary": {"samples": 4, "requests": 4}},
}


# Test tiers are markers on the tests themselves (declared in pyproject.toml, whose addopts make a bare `pytest` run
# the fast tier; `make test` runs them all). One tier is checked here: whatever asks for the `snakemake` fixture,
# directly or through a fixture that does (the session's DAG runs), runs the workflow and must be marked e2e.
DAG_FIXTURE = "snakemake"


# `make test` runs the tests on two pytest-xdist workers (-n 2). The tests that read one shared DAG run (a fixture that
# runs the workflow once and keeps it) must share a worker, or the DAG runs once per worker: SHARED_DAGS names the
# modules that hold them, and the scheduler below keeps each fixture's modules on one worker. (xdist's own
# `--dist loadgroup` does it by marker, but its marker-to-nodeid step is lost on pytest 9.2.)
SHARED_DAGS = {"zero2": ("test_workflow.py", "test_review_ui.py"), "r1_run": ("test_readme_r1.py",)}


def shared_dag(nodeid: str) -> str | None:
    module = nodeid.split("::")[0].rsplit("/", 1)[-1]
    return next((name for name, modules in SHARED_DAGS.items() if module in modules), None)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SharedDagScheduling(LoadScopeScheduling):
        """A shared DAG's tests as one unit of work (the largest go first), every other test on its own."""

        def _split_scope(self, nodeid: str) -> str:
            return shared_dag(nodeid) or nodeid

    return SharedDagScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items if DAG_FIXTURE in getattr(item, "fixturenames", ()) and not item.get_closest_marker("e2e")]
    if unmarked:
        raise pytest.UsageError(f"these tests run snakemake (the `{DAG_FIXTURE}` fixture) but are not marked e2e; add "
                                f"`pytestmark = pytest.mark.e2e` to the module or `@pytest.mark.e2e` to the test: {', '.join(unmarked)}")
    astray = [item.nodeid for item in items for name in SHARED_DAGS
              if name in getattr(item, "fixturenames", ()) and shared_dag(item.nodeid) != name]
    if astray:
        raise pytest.UsageError(f"these tests read a shared DAG run outside the modules tests/conftest.py's SHARED_DAGS lists "
                                f"for it (under two workers the DAG would run twice): {', '.join(astray)}")
    # The longest first (the DAG runs, then daemons and slow tests), so that the two workers finish together.
    items.sort(key=lambda item: 0 if item.get_closest_marker("e2e") else 1 if item.get_closest_marker("services") or item.get_closest_marker("slow") else 2)


def signed_package(folder: Path, keys: Path, size: int = 2048) -> Path:
    """A real package of `size` random bytes, encrypted under keys/kek.bin and signed with keys/signing.pem."""
    from workflow.package import archive
    from workflow.package.kms import LocalKeyFile

    source = folder.with_suffix(".src")
    source.mkdir()
    (source / "weights.bin").write_bytes(os.urandom(size))
    archive.pack(source, folder, LocalKeyFile(keys / "kek.bin", create=True), archive.load_signing_key(keys / "signing.pem"), {})
    return folder


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _run_snakemake(workdir: Path, config: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the workflow's Snakefile in workdir with config (merged into the tiny defaults). Tests reach it through
    the `snakemake` fixture, which marks them as DAG runs (pytest_collection_modifyitems)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(merge(TINY, config)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml", "--cores", "2", *args],
        cwd=workdir, env=env, capture_output=True, text=True,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"snakemake failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return done


def jobs_planned(done: subprocess.CompletedProcess) -> set[str]:
    """Rule names in a dry run's job table."""
    table = done.stdout.split("Job stats:")[1].split("\n\n")[0] if "Job stats:" in done.stdout else ""
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip() and line.split()[0] != "total"}


def jobs_run(done: subprocess.CompletedProcess) -> set[str]:
    """Rule names of the jobs a real run started (checkpoints add jobs after the first job table)."""
    return set(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):$", done.stdout + done.stderr, re.M))


def copy_of(dag: Path, work: Path) -> Path:
    """A shared DAG directory (zero2, the README's R1 run) copied to work, for a test that runs snakemake again: .snakemake too (its
    provenance decides what reruns), and the MLflow store moved with it (the experiment's artifact root and the
    parent run's results-dir tag name absolute paths), so that nothing the test does lands in the shared one."""
    shutil.copytree(dag, work, symlinks=True)
    old, new = f"{dag.resolve()}/", f"{work.resolve()}/"
    with closing(sqlite3.connect(work / "results" / "mlflow.db")) as db, db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in (row[1] for row in db.execute(f"PRAGMA table_info('{table}')") if re.search("CHAR|TEXT", row[2], re.I)):
                db.execute(f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?) WHERE instr("{column}", ?)', (old, new, old))
    return work


# The session's whole-DAG run: the tiny model, pretrained and fine-tuned long enough to beat its base model, with
# the evaluate gate on. Measured (2-core machine, 2026-11-30): the base answers 0 of the 24 test rows (it has never
# seen the chat format), the fine-tuned model 9 (0.375), perplexity 41.5 -> 1.10; the gate asks for 4 (0.15), which
# a model that learned nothing (e.g. trained with a broken loss mask) cannot reach. The extra pretraining and steps
# cost about a minute on the shared run. MLP 512 as measured then: with the embedded default's 256 (2026-12-04) the
# fine-tuned model answered 5 of 24, one above the gate. Tests that rerun or re-plan it pass this config too (merged
# with their change), so that only what they change reruns.
ZERO2 = {
    "bootstrap": {"pretrain_rows": 2000, "pretrain_steps": 300, "intermediate_size": 512},
    "data": {"generated_rows": 1000, "test_fraction": 0.03},
    "finetune": {"zero_stage": 2, "max_steps": 400, "learning_rate": 0.003, "save_steps": 200, "logging_steps": 40},
    "evaluate": {"max_samples": 24, "gate": {"min_accuracy": 0.15, "min_gain": 0.15}},
}


@pytest.fixture(scope="session")
def snakemake():
    """snakemake(workdir, config, *args, check=True): the workflow run in workdir (a dry run with "-n")."""
    return _run_snakemake


@pytest.fixture(scope="session")
def zero2(tmp_path_factory, snakemake) -> Path:
    """The whole DAG on ZERO2, run once per session: test_workflow looks at what it made and test_review_ui
    reviews it in the MLflow UI. Tests that run snakemake again work on a copy (copy_of)."""
    workdir = tmp_path_factory.mktemp("zero2")
    snakemake(workdir, ZERO2)
    return workdir


@pytest.fixture
def shm():
    """A private scratch folder on /dev/shm (a tmpfs, as packages open only onto memory), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="ft2prod-open-test-", dir="/dev/shm"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer bootstrap model with its R1-style tokenizer, pretrained for a few steps."""
    from workflow.bootstrap.model import BootstrapConfig, make_base_model

    out = tmp_path_factory.mktemp("tiny_base")
    make_base_model(BootstrapConfig(num_layers=2, pretrain_rows=200, pretrain_steps=2, max_position_embeddings=512), out)
    return out


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict:
    """A tiny random-weight checkpoint of each family users bring (tests/families.py), by family name."""
    import families

    root = tmp_path_factory.mktemp("families")
    return {name: families.make(name, root / name) for name in families.FAMILIES}


@pytest.fixture
def tracking(tmp_path):
    from workflow.tracking import Tracking

    return Tracking(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="tests", results_dir=str(tmp_path / "results"))
