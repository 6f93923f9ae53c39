rule bootstrap:
    input:
        plan=plan_done(),
    output:
        model=directory(f"{RESULTS}/bootstrap/model"),
    params:
        settings=config["bootstrap"],
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
    input:
        plan=plan_done(),
    output:
        f"{RESULTS}/data/generated.jsonl",
    params:
        rows=config["data"]["generated_rows"],
        seed=config["seed"],
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


rule prepare_data:
    input:
        dataset=dataset_file,
        model=base_model_dir,
        template=training_template,
        plan=plan_done(),
    output:
        train=f"{RESULTS}/data/train.jsonl",
        val=f"{RESULTS}/data/val.jsonl",
        test=f"{RESULTS}/data/test.jsonl",
        stats=f"{RESULTS}/data/stats.json",
    params:
        settings=data_settings(),
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
