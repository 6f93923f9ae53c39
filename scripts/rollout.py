"""Snakemake adapter for rule rollout: serve the package behind the gateway and run the canary checks."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.rollout.stage import rollout
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

rollout(
    package_dir=snakemake.input.package,
    registered_path=snakemake.input.registered,
    selection_path=snakemake.input.selection,
    test_path=snakemake.input.test,
    out_path=snakemake.output[0],
    config=config,
    tracking=Tracking.from_config(config, snakemake.log[0]),
)
