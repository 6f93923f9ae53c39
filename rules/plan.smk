# The plan is made when the workflow is parsed (rules/common.smk: planned), so a config that cannot run stops before
# any job; this rule writes it down (plan.json, plan.md, MLflow) on the submit host. No job waits for it.
localrules:
    plan,


rule plan:
    input:
        model_config=base_model_config,
    output:
        plan=f"{RESULTS}/plan/plan.json",
        report=f"{RESULTS}/plan/plan.md",
    params:
        plan=plan_record(),
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
