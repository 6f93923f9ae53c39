# The embedded default only: the small base model and the arithmetic reasoning dataset, made locally.
rule bootstrap:
    output:
        model=directory(f"{RESULTS}/bootstrap/model"),
    params:
        settings=dump(CONFIG.bootstrap),
    log:
        f"{RESULTS}/logs/bootstrap.log",
    benchmark:
        f"{RESULTS}/benchmarks/bootstrap.tsv"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/bootstrap.py"


rule generate_data:
    output:
        f"{RESULTS}/data/generated.jsonl",
    params:
        rows=CONFIG.data.generated_rows,
        seed=CONFIG.seed,
    log:
        f"{RESULTS}/logs/generate_data.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/generate_data.py"
