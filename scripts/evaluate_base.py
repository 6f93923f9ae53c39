"""Snakemake adapter for rule evaluate_base: score the base model on the test split."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import Cluster, EvalConfig
from workflow.evaluate import evaluate_base
from workflow.tracking import Tracking

evaluate_base(
    model_dir=snakemake.input.model,
    test_path=snakemake.input.test,
    out_path=snakemake.output[0],
    cfg=EvalConfig(**snakemake.params.settings),
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
    cluster=Cluster(**snakemake.config["cluster"]),
)
