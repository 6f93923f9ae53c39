# The review summary on the MLflow parent run: the DAG picture (snakemake --dag, graphviz), the Snakemake
# report and the summary (gates, schemes, package, registry, rollout, runs), after everything else.
rule summary:
    input:
        pipeline_targets(),
    output:
        html=f"{RESULTS}/summary/summary.html",
        markdown=f"{RESULTS}/summary/summary.md",
        dag=f"{RESULTS}/summary/dag.svg",
        report=f"{RESULTS}/summary/snakemake-report.html",
    params:
        snakefile=f"{workflow.basedir}/Snakefile",
    log:
        f"{RESULTS}/logs/summary.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/summary.py"
