# Named helpers for the rules: paths and config look-ups. No logic beyond wiring.
from workflow.config import settings
from workflow.engine.release import TENSORRT_LLM_IMAGE
from workflow.plan import checked_plan
from workflow.schemes import WILDCARD as SCHEME_WILDCARD, buildable

RESULTS = "results"
TENSORRT_LLM_CONTAINER = f"docker://{TENSORRT_LLM_IMAGE}"


def typed_config(config):
    """The validated, typed config (workflow/config.py declares each key), every default filled in; a wrong key or
    value stops the workflow before anything runs, naming the key and what is allowed. The rules read it by attribute;
    Snakemake's own `config` is then replaced by its complete dump, which every job re-validates whole
    (`settings(snakemake.config)`), so no stage ever sees a section rebuilt from picked keys."""
    return settings(config)


def planned(config):
    """The plan, made as the workflow is parsed: a config that cannot run (memory, lengths across stages, features
    not installed) stops here, before any job, naming the keys and a fix. No job waits for the plan rule, so a
    config change reruns, in one invocation, exactly the jobs whose own inputs or params changed."""
    return checked_plan(config)


def dump(section, *leave_out):
    """A typed section as plain data for a rule's params: what reruns the rule when it changes. Jobs never read
    params for settings: they take their typed sections from the whole validated config."""
    return section.model_dump(mode="json", exclude=set(leave_out))


def data_settings():
    """The data section less what only picks the dataset file (an input already)."""
    return dump(CONFIG.data, "path", "generated_rows")


def eval_settings():
    return dump(CONFIG.evaluate, "gate")


def evaluation_file(wildcards=None):
    """evaluate.path, the user's evaluation rows, when set: prepare_data makes the test split from it."""
    return [CONFIG.evaluate.path] if CONFIG.evaluate.path else []


def metric_files(wildcards=None):
    """The scorer's module or the lm_eval task files: editing them reruns every scoring job."""
    from workflow.metrics import metric_files as files

    return files(CONFIG.evaluate)


def scheme_gates(wildcards):
    """The scheme's gate thresholds (accuracy loss, closeness) and the closeness rows: what reruns its checks."""
    q = CONFIG.quantize
    return {
        "max_accuracy_loss": getattr(q.max_accuracy_loss, wildcards.scheme),
        "max_kl": getattr(q.max_kl, wildcards.scheme),
        "min_agreement": getattr(q.min_agreement, wildcards.scheme),
        "closeness_rows": q.closeness_rows,
    }


def package_settings():
    return dump(CONFIG.package, "model_name", "backup_dir", "trusted_signer")


def base_model_dir(wildcards=None):
    """The base checkpoint: built locally for the embedded default, else the configured path."""
    if CONFIG.base_model == "bootstrap":
        return f"{RESULTS}/bootstrap/model"
    return CONFIG.base_model


def dataset_file(wildcards=None):
    """The raw dataset: generated for the embedded default, else the configured JSONL file."""
    if CONFIG.data.path == "generated":
        return f"{RESULTS}/data/generated.jsonl"
    return CONFIG.data.path


def training_template(wildcards=None):
    """A training template file given as data.chat_template is an input, so editing it reruns prepare_data."""
    value = CONFIG.data.chat_template
    return [] if value in ("auto", "model") else [value]


def pipeline_targets():
    """Through promotion, unless the target is Kubernetes with no context to apply to: then the validated manifests.
    The summary rule comes after all of it."""
    if CONFIG.rollout.target == "kubernetes" and not CONFIG.rollout.kubernetes.context:
        return [f"{RESULTS}/rollout/report.json"]
    return [f"{RESULTS}/rollout/promoted.json"]


def refresh_summary():
    """The review summary on the MLflow parent run, refreshed when a run of snakemake ends (onsuccess, onerror):
    once per workflow run on the submit host, not inside every job; a summary that cannot be made only warns."""
    from workflow.summary import refresh_quietly
    from workflow.tracking import Tracking

    refresh_quietly(Tracking.from_config(CONFIG, results_dir=RESULTS))


def final_targets():
    return [f"{RESULTS}/plan/plan.json"] + pipeline_targets() + [f"{RESULTS}/summary/summary.html"]


def schemes():
    """The configured schemes the model's shapes take (the plan drops the others, with their reason, in plan.md)."""
    return [s for s in CONFIG.quantize.schemes if "dropped" not in PLAN["schemes"][s]]


def backend():
    return CONFIG.engine.backend


def buildable_schemes():
    """Schemes the configured backend can build (ONNX Runtime GenAI has no FP8 kernels)."""
    return [s for s in schemes() if buildable(s, backend(), CONFIG.engine.onnxruntime.execution_provider)]


def passed_quantization(scheme):
    """Read after the scheme's evaluate_quantized checkpoint: did it pass its accuracy gate?"""
    import json

    with open(checkpoints.evaluate_quantized.get(scheme=scheme).output[0]) as handle:
        return json.load(handle)["passed"]


def engine_dirs(wildcards):
    return [f"{RESULTS}/engine/{backend()}/{s}" for s in buildable_schemes() if passed_quantization(s)]


def benchmark_files(wildcards):
    return [f"{RESULTS}/benchmark/{backend()}/{s}.json" for s in buildable_schemes() if passed_quantization(s)]


def trtllm_gpus():
    """GPUs a TensorRT-LLM engine spans: tp x pp."""
    return CONFIG.engine.tensorrt_llm.tp_size * CONFIG.engine.tensorrt_llm.pp_size


def selected_engine(wildcards):
    """The engine folder that select chose (read once select has run)."""
    import json

    with open(checkpoints.select.get().output.selection) as handle:
        return json.load(handle)["engine_dir"]


def base_model_config(wildcards=None):
    """The base model's config.json for the plan; none for bootstrap (the plan reads the bootstrap settings)."""
    if CONFIG.base_model == "bootstrap":
        return []
    return [f"{CONFIG.base_model}/config.json"]


def plan_record():
    """What the plan found (rerun-triggering only: the plan job writes it down again when it changes)."""
    return {key: value for key, value in PLAN.items() if key != "source"}


def finetune_gpus():
    """GPUs the finetune job requests: gpus_per_node x nodes (0 on a CPU machine)."""
    return CONFIG.cluster.gpus_per_node * CONFIG.cluster.nodes


def finetune_nodes():
    return CONFIG.cluster.nodes


def multi_node(value):
    """A resource only multi-node jobs carry: the SLURM plugin then runs the job script once on the first
    node (no `srun -n1` around it) and the launcher starts one process per node itself with srun."""
    return value if CONFIG.cluster.nodes > 1 else None


def model_gpus():
    """GPUs a job that runs the model itself asks for: one when the cluster has GPUs (workflow.generation uses it)."""
    return 1 if CONFIG.cluster.gpus_per_node > 0 else 0


def serving_gpus():
    """GPUs the rollout's local gateway and canary reference run the engine on: the PyTorch engine's one GPU."""
    return model_gpus() if backend() == "pytorch" else 0


def generation_runtime(wildcards=None, attempt=1):
    """Minutes a job that generates for the test split asks for, from its token count (workflow.generation)."""
    from workflow.generation import runtime_minutes

    return runtime_minutes(CONFIG.evaluate.max_samples, CONFIG.evaluate.max_new_tokens, model_gpus() > 0)
