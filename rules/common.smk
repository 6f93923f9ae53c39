# Named helpers for the rules: paths and config look-ups. No logic beyond wiring.
from workflow.config import check as check_schema

RESULTS = "results"


def check_config(config):
    """Clear, per-key errors before Snakemake's own validation fills the defaults."""
    check_schema(config, workflow.source_path("../config/schema.yaml"))


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


def data_settings():
    keys = ("on_bad_row", "val_fraction", "test_fraction", "max_seq_len")
    return {key: config["data"][key] for key in keys} | {"seed": config["seed"]}


def pipeline_targets():
    """Through promotion, unless the target is Kubernetes with no context to apply to: then the validated manifests.
    The summary rule comes after all of it."""
    rollout = config["rollout"]
    if rollout["target"] == "kubernetes" and not rollout["kubernetes"]["context"]:
        return [f"{RESULTS}/rollout/report.json"]
    return [f"{RESULTS}/rollout/promoted.json"]


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
