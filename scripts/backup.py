"""Snakemake adapter for rule backup: copy the package to the backup location and verify the copy."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.package.stage import backup

backup(
    package_dir=snakemake.input[0],
    backup_root=snakemake.params.backup_dir,
    out_path=snakemake.output[0],
    signing_key=snakemake.params.signing_key,
)
