# Named helpers for the rules: paths and config look-ups. No logic beyond wiring.
from workflow.config import check, settings
from workflow.plan import checked_plan
from workflow.schemes import WILDCARD as SCHEME_WILDCARD

RESULTS = "results"


def checked_config(config):
    """The config with every default filled in (workflow/config.py declares each key); a wrong key or value stops
    the workflow before anything runs, naming the key and what is allowed."""
    return check(config)


def planned(config):
    """The plan, made as the workflow is parsed: a config that cannot run (memory, lengths across stages, features
    not installed) stops here, before any job, naming the keys and a fix. No job waits for the plan rule, so a
    config change reruns, in one invocation, exactly the jobs whose own inputs or params changed."""
    return checked_plan(settings(config))


def base_model_dir(wildcards=None):
    """The base checkpoint: built locally for the embedded default, else the configured path."""
    if config["base_model"] == "bootstrap":
        return f"{RESULTS}/bootstrap/model"
    return config["base_model"]


def dataset_file(wildcards=None):
    """The raw dataset: generated for the embedded default, else the configured JSONL file."""
    if config["data"]["path"] == "generated":
        return f"{RESULTS}/data/generated.jsonl"
    return config["data"]["path"]


def training_template(wildcards=None):
    """A training template file given as data.chat_template is an input, so editing it reruns prepare_data."""
    value = config["data"]["chat_template"]
    return [] if value in ("auto", "model") else [value]


def data_settings():
    """The data section less what only picks the dataset file (an input already)."""
    return {key: value for key, value in config["data"].items() if key not in ("path", "generated_rows")}


def pipeline_targets():
    """Through promotion, unless the target is Kubernetes with no context to apply to: then the validated manifests.
    The summary rule comes after all of it."""
    rollout = config["rollout"]
    if rollout["target"] == "kubernetes" and not rollout["kubernetes"]["context"]:
        return [f"{RESULTS}/rollout/report.json"]
    return [f"{RESULTS}/rollout/promoted.json"]


def refresh_summary():
    """The review summary on the MLflow parent run, refreshed when a run of snakemake ends (onsuccess, onerror):
    once per workflow run on the submit host, not inside every job; a summary that cannot be made only warns."""
    from workflow.summary import refresh_quietly
    from workflow.tracking import Tracking

    refresh_quietly(Tracking.from_config(config, results_dir=RESULTS))


def final_targets():
    return [f"{RESULTS}/plan/plan.json"] + pipeline_targets() + [f"{RESULTS}/summary/summary.html"]


def eval_settings():
    return {key: value for key, value in config["evaluate"].items() if key != "gate"}


def schemes():
    """The configured schemes the model's shapes take (the plan drops the others, with their reason, in plan.md)."""
    return [s for s in config["quantize"]["schemes"] if "dropped" not in PLAN["schemes"][s]]


def backend():
    return config["engine"]["backend"]


def max_accuracy_loss(wildcards):
    return config["quantize"]["max_accuracy_loss"][wildcards.scheme]


def buildable_schemes():
    """Schemes the configured backend can build (ONNX Runtime GenAI has no FP8 kernels)."""
    from workflow.engine.onnxruntime import PRECISIONS

    if backend() == "onnxruntime":
        return [s for s in schemes() if s in PRECISIONS[config["engine"]["onnxruntime"]["execution_provider"]]]
    return schemes()


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
    settings = config["engine"]["tensorrt_llm"]
    return settings["tp_size"] * settings["pp_size"]


def selected_engine(wildcards):
    """The engine folder that select chose (read once select has run)."""
    import json

    with open(checkpoints.select.get().output.selection) as handle:
        return json.load(handle)["engine_dir"]


def package_settings():
    return {key: value for key, value in config["package"].items() if key not in ("model_name", "backup_dir", "trusted_signer")}


def base_model_config(wildcards=None):
    """The base model's config.json for the plan; none for bootstrap (the plan reads the bootstrap settings)."""
    if config["base_model"] == "bootstrap":
        return []
    return [f"{config['base_model']}/config.json"]


def plan_record():
    """What the plan found (rerun-triggering only: the plan job writes it down again when it changes)."""
    return {key: value for key, value in PLAN.items() if key != "source"}


def finetune_gpus():
    """GPUs the finetune job requests: gpus_per_node x nodes (0 on a CPU machine)."""
    return config["cluster"]["gpus_per_node"] * config["cluster"]["nodes"]


def finetune_nodes():
    return config["cluster"]["nodes"]


def multi_node(value):
    """A resource only multi-node jobs carry: the SLURM plugin then runs the job script once on the first
    node (no `srun -n1` around it) and the launcher starts one process per node itself with srun."""
    return value if config["cluster"]["nodes"] > 1 else None
