"""Snakemake adapter for rule select: choose the production scheme by policy, with its evidence."""
from pathlib import Path

from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.select import select
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

select(
    schemes=list(config.quantize.schemes),
    quantized_paths={Path(p).stem: p for p in snakemake.input.quantized},
    engine_dirs={Path(p).name: p for p in snakemake.input.engines},
    benchmark_paths={Path(p).stem: p for p in snakemake.input.benchmarks},
    cfg=config.select,
    backend=config.engine.backend,
    out_path=snakemake.output.selection,
    report_path=snakemake.output.report,
    tracking=Tracking.from_config(config, snakemake.log[0]),
)
