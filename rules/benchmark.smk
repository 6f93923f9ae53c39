rule benchmark_onnxruntime:
    input:
        engine=f"{RESULTS}/engine/onnxruntime/{{scheme}}",
        tokenizer=f"{RESULTS}/model",
    output:
        f"{RESULTS}/benchmark/onnxruntime/{{scheme}}.json",
    params:
        settings=dump(CONFIG.engine),
        load=dump(CONFIG.benchmark),
    log:
        f"{RESULTS}/logs/benchmark/onnxruntime/{{scheme}}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/benchmark.py"


rule benchmark_tensorrt_llm:
    input:
        engine=f"{RESULTS}/engine/tensorrt_llm/{{scheme}}",
        tokenizer=f"{RESULTS}/model",
    output:
        f"{RESULTS}/benchmark/tensorrt_llm/{{scheme}}.json",
    params:
        settings=dump(CONFIG.engine),
        load=dump(CONFIG.benchmark),
    log:
        f"{RESULTS}/logs/benchmark/tensorrt_llm/{{scheme}}.log",
    threads: 8
    resources:
        mem_mb=64000,
        runtime=60,
        gpu=trtllm_gpus(),
    container:
        TENSORRT_LLM_CONTAINER
    script:
        "../scripts/benchmark.py"


rule benchmark_pytorch:
    input:
        engine=f"{RESULTS}/engine/pytorch/{{scheme}}",
        tokenizer=f"{RESULTS}/model",
    output:
        f"{RESULTS}/benchmark/pytorch/{{scheme}}.json",
    params:
        settings=dump(CONFIG.engine),
        load=dump(CONFIG.benchmark),
    log:
        f"{RESULTS}/logs/benchmark/pytorch/{{scheme}}.log",
    threads: 4
    resources:
        mem_mb=16000,
        runtime=60,
        gpu=model_gpus(),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/benchmark.py"
