"""Snakemake adapter for rule select: choose the production scheme by policy, with its evidence."""
from pathlib import Path

from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.select import select
from workflow.tracking import Tracking

select(
    schemes=snakemake.params.schemes,
    quantized_paths={Path(p).stem: p for p in snakemake.input.quantized},
    engine_dirs={Path(p).name: p for p in snakemake.input.engines},
    benchmark_paths={Path(p).stem: p for p in snakemake.input.benchmarks},
    policy=snakemake.params.settings["policy"],
    slo_p95_s=snakemake.params.settings["latency_slo_p95_s"],
    backend=snakemake.params.backend,
    out_path=snakemake.output.selection,
    report_path=snakemake.output.report,
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
