"""Every stage gets the whole validated config: the user's values, never a section rebuilt from picked keys whose
missing keys quietly took their defaults (the plan planned stock DeepSpeed buckets as tuned ones, prepare_data
recorded `data.path: generated` for a user's own dataset)."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from workflow.bootstrap.problems import generate_data

pytestmark = pytest.mark.e2e  # runs the plan and prepare_data rules for real (about 30 s)


def test_plan_and_prepare_data_see_the_users_values(tmp_path, tiny_base, tracking, snakemake):
    rows = tmp_path / "our_rows.jsonl"
    generate_data(str(rows), 120, seed=3, tracking=tracking)
    user = {"base_model": str(tiny_base), "data": {"path": str(rows)},
            "finetune": {"zero_tuning": "stock", "liger_kernel": False}}  # both differ from the declared defaults
    snakemake(tmp_path / "work", user, "results/plan/plan.json", "results/data/stats.json")  # no job waits for the plan
    results = tmp_path / "work" / "results"

    plan = json.loads((results / "plan" / "plan.json").read_text())
    assert plan["training"]["setup"]["zero_tuning"] == "stock", "the plan sized DeepSpeed's buckets for other settings"
    assert plan["resolved"]["finetune"]["zero_tuning"] == "stock"
    assert plan["resolved"]["finetune"]["liger_kernel"] is False

    client = MlflowClient(f"sqlite:///{results}/mlflow.db")
    experiment = client.get_experiment_by_name("ft2prod").experiment_id
    (prepare,) = client.search_runs([experiment], "attributes.run_name = 'prepare_data'")
    assert prepare.data.params["data.path"] == str(rows), "prepare_data recorded another dataset than the one it read"
    (planned,) = client.search_runs([experiment], "attributes.run_name = 'plan'")
    assert planned.data.params["finetune.zero_tuning"] == "stock"
    assert planned.data.params["finetune.liger_kernel"] == "False"
