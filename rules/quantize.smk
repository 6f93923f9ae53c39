rule quantize:
    input:
        model=f"{RESULTS}/model",
        train=f"{RESULTS}/data/train.jsonl",
    output:
        directory(f"{RESULTS}/quantize/{{scheme}}"),
    params:
        calib_samples=CONFIG.quantize.calib_samples,
    log:
        f"{RESULTS}/logs/quantize/{{scheme}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/quantize/{{scheme}}.tsv"
    wildcard_constraints:
        scheme=SCHEME_WILDCARD,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=generation_runtime,
        gpu=model_gpus(),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/quantize.py"


checkpoint evaluate_quantized:
    input:
        model=f"{RESULTS}/model",
        quantized=f"{RESULTS}/quantize/{{scheme}}",
        test=f"{RESULTS}/data/test.jsonl",
        metric=metric_files,
        finetuned=f"{RESULTS}/evaluate/finetuned.json",
    output:
        f"{RESULTS}/evaluate_quantized/{{scheme}}.json",
    params:
        gates=scheme_gates,
        settings=eval_settings(),
    log:
        f"{RESULTS}/logs/evaluate_quantized/{{scheme}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_quantized/{{scheme}}.tsv"
    wildcard_constraints:
        scheme=SCHEME_WILDCARD,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=generation_runtime,
        gpu=model_gpus(),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/evaluate_quantized.py"
