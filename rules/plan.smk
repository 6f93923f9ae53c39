# Runs first, on the submit host (no queue, no GPU): a config that cannot fit its cluster stops here in seconds.
localrules:
    plan,


rule plan:
    input:
        model_config=base_model_config,
    output:
        plan=f"{RESULTS}/plan/plan.json",
        report=f"{RESULTS}/plan/plan.md",
    params:
        settings=plan_settings(),
    log:
        f"{RESULTS}/logs/plan.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
        gpu=0,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/plan.py"
