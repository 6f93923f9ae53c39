"""Snakemake adapter for rule package: encrypt, sign and attest the selected engine, then verify it."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.package.stage import package
from workflow.tracking import Tracking

package(
    selection_path=snakemake.input.selection,
    base_model=snakemake.input.base,
    out_dir=snakemake.output[0],
    settings=snakemake.params.settings,
    config=snakemake.config,
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
