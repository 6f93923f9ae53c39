"""Snakemake adapter for rule select: choose the production scheme by policy, with its evidence."""
from pathlib import Path

from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.select import select
from workflow.tracking import Tracking

select(
    snakemake.params.schemes,
    {Path(p).stem: p for p in snakemake.input.quantized},
    {Path(p).name: p for p in snakemake.input.engines},
    {Path(p).stem: p for p in snakemake.input.benchmarks},
    snakemake.params.settings["policy"],
    snakemake.params.settings["latency_slo_p95_s"],
    snakemake.params.backend,
    snakemake.output.selection,
    snakemake.output.report,
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
