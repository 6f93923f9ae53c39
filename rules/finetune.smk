rule finetune:
    input:
        model=base_model_dir,
        train=f"{RESULTS}/data/train.jsonl",
        val=f"{RESULTS}/data/val.jsonl",
    output:
        summary=f"{RESULTS}/finetune/summary.json",
    params:
        settings=dump(CONFIG.finetune),
        seed=CONFIG.seed,
    log:
        f"{RESULTS}/logs/finetune.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=finetune_gpus(),
        nodes=finetune_nodes(),
        mpi=multi_node("srun"),
        tasks=multi_node(finetune_nodes()),
        tasks_per_gpu=multi_node(0),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/finetune.py"


rule export:
    input:
        model=base_model_dir,
        summary=f"{RESULTS}/finetune/summary.json",
    output:
        model=directory(f"{RESULTS}/model"),
    params:
        settings=dump(CONFIG.finetune),
    log:
        f"{RESULTS}/logs/export.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/export.py"
