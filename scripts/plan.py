"""Snakemake adapter for rule plan: the plan made at parse time, written down (JSON, Markdown) and logged to MLflow."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from pathlib import Path

from workflow.config import settings
from workflow.plan import plan
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

plan(
    model_dir=str(Path(snakemake.input[0]).parent) if len(snakemake.input) else None,  # no config.json: the bootstrap settings
    config=config,
    json_path=snakemake.output.plan,
    md_path=snakemake.output.report,
    tracking=Tracking.from_config(config, snakemake.log[0]),
)
