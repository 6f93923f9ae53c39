"""Snakemake adapter for rule backup: copy the package to the backup location and verify the copy."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.package.stage import backup

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

backup(
    package_dir=snakemake.input[0],
    out_path=snakemake.output[0],
    settings=config.package,
)
