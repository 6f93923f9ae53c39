"""Snakemake adapter for rule rollout: serve the package behind the gateway and run the canary checks."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.rollout.stage import rollout
from workflow.tracking import Tracking

rollout(
    package_dir=snakemake.input.package,
    registered_path=snakemake.input.registered,
    selection_path=snakemake.input.selection,
    test_path=snakemake.input.test,
    out_path=snakemake.output[0],
    config=snakemake.config,
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
