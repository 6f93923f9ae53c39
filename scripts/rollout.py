"""Snakemake adapter for rule rollout: serve the package behind the gateway and run the canary checks."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.rollout.stage import rollout
from workflow.tracking import Tracking

rollout(
    snakemake.input.package,
    snakemake.input.registered,
    snakemake.input.selection,
    snakemake.input.test,
    snakemake.output[0],
    snakemake.config,
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
