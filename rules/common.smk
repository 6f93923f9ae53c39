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


def final_targets():
    return [f"{RESULTS}/evaluate/finetuned.json"]


def eval_settings():
    return {key: value for key, value in config["evaluate"].items() if key != "gate"}
