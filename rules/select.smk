checkpoint select:
    input:
        quantized=expand(f"{RESULTS}/evaluate_quantized/{{scheme}}.json", scheme=schemes()),
        engines=engine_dirs,
        benchmarks=benchmark_files,
    output:
        selection=f"{RESULTS}/select/selection.json",
        report=f"{RESULTS}/select/report.md",
    params:
        schemes=schemes(),
        settings=dump(CONFIG.select),
        backend=backend(),
    log:
        f"{RESULTS}/logs/select.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/select.py"
