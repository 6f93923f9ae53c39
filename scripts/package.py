"""Snakemake adapter for rule package: encrypt, sign and attest the selected engine, then verify it."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.package.stage import package
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

package(
    selection_path=snakemake.input.selection,
    base_model=snakemake.input.base,
    out_dir=snakemake.output[0],
    config=config,
    tracking=Tracking.from_config(config, snakemake.log[0]),
)
