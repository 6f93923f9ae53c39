"""Shared fixtures: a tiny locally built base model, and a helper that runs the real Snakemake DAG."""

from __future__ import annotations

import os
import subprocess
import sys
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
    "quantize": {"calib_samples": 4, "max_accuracy_loss": dict.fromkeys(SCHEMES, 1.0)},
    "benchmark": {"input_len": 24, "output_len": 8, "concurrency": [1, 2], "requests": 4},
    "rollout": {"canary": {"samples": 4, "requests": 4}},
}


# What `make test-fast` (-m "not e2e and not services and not slow") leaves out, beside the modules that mark
# themselves e2e: by file, or file::test. Markers are declared in pyproject.toml; `make test` runs everything.
MARKED = {
    "services": {  # needs Debian packages that `make system` installs (root), or starts their daemons
        "test_launch_slurm.py",  # scontrol (slurm-wlm)
        "test_package.py::test_softhsm2_holds_the_key",  # softhsm2
        "test_slurm.py", "test_tracking_server.py", "test_review_ui.py",  # SLURM, PostgreSQL, Chromium
    },
    "e2e": {"test_plan.py::test_plan_rule_runs_first_and_stops_a_config_that_cannot_fit"},  # runs the plan rule for real
    "slow": {  # 30 s to 2 min each on a busy 2-core machine: real op builds, training, process lifecycles
        "test_finetune_units.py::test_an_op_build_killed_half_way_does_not_block_later_launches",
        "test_finetune_units.py::test_compiled_decoder_layers_train_as_the_eager_ones",
        "test_serve.py::test_sigterm_finishes_the_request_in_flight",
        "test_serve.py::test_forwarding_to_an_upstream_openai_compatible_server",
        "test_soak.py",  # a minute of load on the gateway (benchmarks/soak.py)
        "test_fuzz.py",  # ~2,900 requests from the gateway's OpenAPI document (Schemathesis)
        "test_serve_guard.py",  # hundreds of slow connections against a running gateway
    },
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        where = {item.path.name, f"{item.path.name}::{item.originalname}"}
        for marker, marked in MARKED.items():
            if where & marked:
                item.add_marker(marker)


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def snakemake(workdir: Path, config: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the workflow's Snakefile in workdir with config (merged into the tiny defaults)."""
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


# The session's whole-DAG run: the tiny model, pretrained and fine-tuned long enough to beat its base model, with
# the evaluate gate on. Measured (2-core machine, 2026-11-30): the base answers 0 of the 24 test rows (it has never
# seen the chat format), the fine-tuned model 9 (0.375), perplexity 41.5 -> 1.10; the gate asks for 4 (0.15), which
# a model that learned nothing (e.g. trained with a broken loss mask) cannot reach. The extra pretraining and steps
# cost about a minute on the shared run. Tests that rerun or re-plan it pass this config too (merged with their
# change), so that only what they change reruns.
ZERO2 = {
    "bootstrap": {"pretrain_rows": 2000, "pretrain_steps": 300},
    "data": {"generated_rows": 1000, "test_fraction": 0.03},
    "finetune": {"zero_stage": 2, "max_steps": 400, "learning_rate": 0.003, "save_steps": 200, "logging_steps": 40},
    "evaluate": {"max_samples": 24, "gate": {"min_accuracy": 0.15, "min_gain": 0.15}},
}


@pytest.fixture(scope="session")
def zero2(tmp_path_factory) -> Path:
    """The whole DAG on ZERO2, run once per session: test_workflow looks at what it made and test_review_ui
    reviews it in the MLflow UI. Tests that run snakemake again work on a copy (test_workflow.copy_of)."""
    workdir = tmp_path_factory.mktemp("zero2")
    snakemake(workdir, ZERO2)
    return workdir


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer bootstrap model with its R1-style tokenizer, pretrained for a few steps."""
    from workflow.bootstrap.model import BootstrapConfig, make_base_model

    out = tmp_path_factory.mktemp("tiny_base")
    make_base_model(BootstrapConfig(num_layers=2, pretrain_rows=200, pretrain_steps=2, max_position_embeddings=512), out)
    return out


@pytest.fixture
def tracking(tmp_path):
    from workflow.tracking import Tracking

    return Tracking(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="tests", results_dir=str(tmp_path / "results"))
