rule prepare_data:
    input:
        dataset=dataset_file,
        model=base_model_dir,
        template=training_template,
        evaluation=evaluation_file,
    output:
        train=f"{RESULTS}/data/train.jsonl",
        val=f"{RESULTS}/data/val.jsonl",
        test=f"{RESULTS}/data/test.jsonl",
        stats=f"{RESULTS}/data/stats.json",
    params:
        settings=data_settings(),
        seed=CONFIG.seed,
    log:
        f"{RESULTS}/logs/prepare_data.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/prepare_data.py"
