"""Snakemake adapter for rule package: encrypt, sign and attest the selected engine, then verify it."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.package.stage import package
from workflow.tracking import Tracking

package(
    snakemake.input.selection,
    snakemake.input.base,
    snakemake.output[0],
    snakemake.params.settings,
    snakemake.config,
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
