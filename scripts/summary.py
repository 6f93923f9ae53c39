"""Snakemake adapter for rule summary: DAG picture, Snakemake report and the pipeline summary on the parent run."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.summary import build
from workflow.tracking import Tracking

build(
    snakemake.params.snakefile,
    snakemake.config,
    snakemake.output.html,
    snakemake.output.markdown,
    snakemake.output.dag,
    snakemake.output.report,
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
