rule rollout:
    input:
        package=f"{RESULTS}/package/model.ftpkg",
        registered=f"{RESULTS}/package/registered.json",
        backup=f"{RESULTS}/package/backup.json",
        selection=f"{RESULTS}/select/selection.json",
        test=f"{RESULTS}/data/test.jsonl",
    output:
        f"{RESULTS}/rollout/report.json",
    params:
        settings=dump(CONFIG.rollout),
    log:
        f"{RESULTS}/logs/rollout.log",
    benchmark:
        f"{RESULTS}/benchmarks/rollout.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=serving_gpus(),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/rollout.py"


rule promote:
    input:
        f"{RESULTS}/rollout/report.json",
    output:
        f"{RESULTS}/rollout/promoted.json",
    log:
        f"{RESULTS}/logs/promote.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/promote.py"
