rule build_engine_onnxruntime:
    input:
        model=f"{RESULTS}/model",
        quantized=f"{RESULTS}/quantize/{{scheme}}",
        test=f"{RESULTS}/data/test.jsonl",
        metric=metric_files,
        finetuned=f"{RESULTS}/evaluate/finetuned.json",
    output:
        directory(f"{RESULTS}/engine/onnxruntime/{{scheme}}"),
    params:
        settings=dump(CONFIG.engine),
        gates=scheme_gates,
        eval_settings=eval_settings(),
    log:
        f"{RESULTS}/logs/build_engine/onnxruntime/{{scheme}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/build_engine/onnxruntime/{{scheme}}.tsv"
    threads: 1  # two builds at once on 2 cores: much of a build on a small model is starting Python
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/build_engine.py"


# TensorRT-LLM runs in NVIDIA's release container (snakemake --sdm apptainer) on tp x pp GPUs.
rule build_engine_tensorrt_llm:
    input:
        model=f"{RESULTS}/model",
        quantized=f"{RESULTS}/quantize/{{scheme}}",
        test=f"{RESULTS}/data/test.jsonl",
        metric=metric_files,
        finetuned=f"{RESULTS}/evaluate/finetuned.json",
    output:
        directory(f"{RESULTS}/engine/tensorrt_llm/{{scheme}}"),
    params:
        settings=dump(CONFIG.engine),
        gates=scheme_gates,
        eval_settings=eval_settings(),
    log:
        f"{RESULTS}/logs/build_engine/tensorrt_llm/{{scheme}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/build_engine/tensorrt_llm/{{scheme}}.tsv"
    threads: 8
    resources:
        mem_mb=64000,
        runtime=120,
        gpu=trtllm_gpus(),
    container:
        TENSORRT_LLM_CONTAINER
    script:
        "../scripts/build_engine.py"


# The unquantized baseline served by Transformers, on one GPU when the cluster has them (workflow/engine/pytorch.py).
rule build_engine_pytorch:
    input:
        model=f"{RESULTS}/model",
        quantized=f"{RESULTS}/quantize/{{scheme}}",
        test=f"{RESULTS}/data/test.jsonl",
        metric=metric_files,
        finetuned=f"{RESULTS}/evaluate/finetuned.json",
    output:
        directory(f"{RESULTS}/engine/pytorch/{{scheme}}"),
    params:
        settings=dump(CONFIG.engine),
        gates=scheme_gates,
        eval_settings=eval_settings(),
    log:
        f"{RESULTS}/logs/build_engine/pytorch/{{scheme}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/build_engine/pytorch/{{scheme}}.tsv"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=generation_runtime,
        gpu=model_gpus(),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/build_engine.py"
