"""Snakemake adapter for rule summary: DAG picture, Snakemake report and the pipeline summary on the parent run."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.summary import summary
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

summary(
    snakefile=snakemake.params.snakefile,
    config=config,
    out_html=snakemake.output.html,
    out_md=snakemake.output.markdown,
    dag_svg=snakemake.output.dag,
    report_html=snakemake.output.report,
    tracking=Tracking.from_config(config, snakemake.log[0]),
)
