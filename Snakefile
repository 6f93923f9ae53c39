# ft2prod: fine-tune -> evaluate -> quantize -> engines -> benchmark -> select -> package -> rollout, tracked in MLflow.
#   snakemake --profile profiles/default          (the embedded default; see README.md)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"


CONFIG = typed_config(config)
config.update(CONFIG.model_dump(mode="json"))
PLAN = planned(CONFIG)


include: "rules/plan.smk"
include: "rules/bootstrap.smk"
include: "rules/data.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/quantize.smk"
include: "rules/engine.smk"
include: "rules/benchmark.smk"
include: "rules/select.smk"
include: "rules/package.smk"
include: "rules/rollout.smk"
include: "rules/summary.smk"


onsuccess:
    refresh_summary()


onerror:
    refresh_summary()


rule all:
    input:
        final_targets(),
    default_target: True
