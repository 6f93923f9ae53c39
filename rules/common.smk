# Named helpers for the rules: paths and config look-ups. No logic beyond wiring.
from workflow.config import check
from workflow.schemes import WILDCARD as SCHEME_WILDCARD

RESULTS = "results"


def checked_config(config):
    """The config with every default filled in (workflow/config.py declares each key); a wrong key or value stops
    the workflow before anything runs, naming the key and what is allowed."""
    return check(config)


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
    return pipeline_targets() + [f"{RESULTS}/summary/summary.html"]


def eval_settings():
    return {key: value for key, value in config["evaluate"].items() if key != "gate"}


def schemes():
    return config["quantize"]["schemes"]


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


PLAN_FINETUNE_KEYS = ("method", "precision", "zero_stage", "offload_optimizer", "offload_params", "micro_batch_size",
                      "gradient_checkpointing", "nproc_per_node", "lora")
BOOTSTRAP_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


def plan_settings():
    """Only what the plan reads, so unrelated config changes do not rerun it."""
    return {
        "finetune": {key: config["finetune"][key] for key in PLAN_FINETUNE_KEYS},
        "max_seq_len": config["data"]["max_seq_len"],
        "cluster": config["cluster"],
        "engine": config["engine"],
        "benchmark": {key: config["benchmark"][key] for key in ("input_len", "output_len", "concurrency")},
        "schemes": schemes(),
        "bootstrap": {key: config["bootstrap"][key] for key in BOOTSTRAP_SHAPE_KEYS},
    }


def plan_done():
    """Every stage waits for a passing plan; ancient(): a re-planned config that still fits reruns nothing."""
    return ancient(f"{RESULTS}/plan/plan.json")


def finetune_gpus():
    """GPUs the finetune job requests: gpus_per_node x nodes (0 on a CPU machine)."""
    return config["cluster"]["gpus_per_node"] * config["cluster"]["nodes"]


def finetune_nodes():
    return config["cluster"]["nodes"]


def multi_node(value):
    """A resource only multi-node jobs carry: the SLURM plugin then runs the job script once on the first
    node (no `srun -n1` around it) and the launcher starts one process per node itself with srun."""
    return value if config["cluster"]["nodes"] > 1 else None


def model_gpus():
    """GPUs a job that runs the model itself asks for: one when the cluster has GPUs (workflow.generation uses it)."""
    return 1 if config["cluster"]["gpus_per_node"] > 0 else 0


def generation_runtime(wildcards=None, attempt=1):
    """Minutes a job that generates for the test split asks for, from its token count (workflow.generation)."""
    from workflow.generation import runtime_minutes

    evaluate = config["evaluate"]
    return runtime_minutes(evaluate["max_samples"], evaluate["max_new_tokens"], model_gpus() > 0)
