rule package:
    input:
        selection=f"{RESULTS}/select/selection.json",
        engine=selected_engine,
        base=base_model_dir,
        stats=f"{RESULTS}/data/stats.json",
    output:
        directory(f"{RESULTS}/package/model.ftpkg"),
    params:
        settings=package_settings(),
    log:
        f"{RESULTS}/logs/package.log",
    benchmark:
        f"{RESULTS}/benchmarks/package.tsv"
    threads: 2
    resources:
        mem_mb=1000,
        runtime=60,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/package.py"


rule register:
    input:
        f"{RESULTS}/package/model.ftpkg",
    output:
        f"{RESULTS}/package/registered.json",
    params:
        model_name=CONFIG.package.model_name,
        settings=package_settings(),
    log:
        f"{RESULTS}/logs/register.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/register.py"


rule backup:
    input:
        f"{RESULTS}/package/model.ftpkg",
    output:
        f"{RESULTS}/package/backup.json",
    params:
        backup_dir=CONFIG.package.backup_dir,
        signing_key=CONFIG.package.signing_key,
    log:
        f"{RESULTS}/logs/backup.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/backup.py"
