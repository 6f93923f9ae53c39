rule evaluate_base:
    input:
        model=base_model_dir,
        test=f"{RESULTS}/data/test.jsonl",
        metric=metric_files,
    output:
        f"{RESULTS}/evaluate/base.json",
    params:
        settings=eval_settings(),
    log:
        f"{RESULTS}/logs/evaluate_base.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_base.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=generation_runtime,
        gpu=model_gpus(),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/evaluate_base.py"


rule evaluate:
    input:
        model=f"{RESULTS}/model",
        test=f"{RESULTS}/data/test.jsonl",
        metric=metric_files,
        base=f"{RESULTS}/evaluate/base.json",
    output:
        metrics=f"{RESULTS}/evaluate/finetuned.json",
        report=f"{RESULTS}/evaluate/report.md",
    params:
        settings=dump(CONFIG.evaluate),
    log:
        f"{RESULTS}/logs/evaluate.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=generation_runtime,
        gpu=model_gpus(),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/evaluate.py"
