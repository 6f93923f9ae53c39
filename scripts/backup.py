"""Snakemake adapter for rule backup: copy the package to the backup location and verify the copy."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.package.stage import backup

backup(snakemake.input[0], snakemake.params.backup_dir, snakemake.output[0], snakemake.params.signing_key)
