"""Snakemake adapter for rule summary: DAG picture, Snakemake report and the pipeline summary on the parent run."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.summary import summary
from workflow.tracking import Tracking

summary(
    snakefile=snakemake.params.snakefile,
    config=snakemake.config,
    out_html=snakemake.output.html,
    out_md=snakemake.output.markdown,
    dag_svg=snakemake.output.dag,
    report_html=snakemake.output.report,
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
