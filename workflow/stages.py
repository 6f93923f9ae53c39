"""The stage table: every stage of the DAG in order, where its rule, code and tests live, and whether it has a gate.

Tracking (run descriptions, gate tags), the pipeline summary (order, what fails the pipeline), the tests and
docs/architecture.md read it. A stage is a Snakemake rule of the same name in rules/<rules>.smk (build_engine and benchmark:
one rule per engine backend, build_engine_onnxruntime, ...), run by scripts/<name>.py, which calls the function
<name> in workflow/<module>; its tests are tests/test_<rules>.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    """The rule, the adapter script and the entry-point function share this name."""
    rules: str
    """rules/<rules>.smk holds the rule; tests/test_<rules>.py its tests."""
    module: str
    """The module under workflow/ whose function <name> does the work."""
    description: str
    """The first line of the stage's MLflow run description."""
    gated: bool = False
    """It records a gate (ft2prod.gate passed/failed)."""
    blocking: bool = False
    """A failed gate fails the pipeline (a failed scheme gate only drops the scheme)."""
    per_scheme: bool = False
    """One job per quantization scheme (the {scheme} wildcard)."""
    tracked: bool = True
    """It opens a child run of the pipeline run in MLflow."""


STAGES = (
    Stage("plan", "plan", "plan", "Checks, before any job runs, that every stage fits the cluster's memory and that the stages' "
          "lengths, schemes and features agree; names the keys and a fix."),
    Stage("bootstrap", "bootstrap", "bootstrap.model",
          "Builds the small base model locally (BPE tokenizer, DeepSeek-R1 chat template) and pretrains it briefly."),
    Stage("generate_data", "bootstrap", "bootstrap.problems",
          "Generates the built-in arithmetic reasoning dataset (chat rows with a think block and a checkable answer)."),
    Stage("prepare_data", "data", "data",
          "Checks, deduplicates, splits and renders the dataset the way the base model's chat template serves it."),
    Stage("finetune", "finetune", "finetune.launch",
          "Fine-tunes the base model with DeepSpeed (full parameters or LoRA), with resumable checkpoints."),
    Stage("export", "finetune", "finetune.export",
          "Exports the trained checkpoint as a self-describing Hugging Face model, logged by reference (digests, no weights)."),
    Stage("evaluate_base", "evaluate", "evaluate",
          "Scores the base model on the held-out test split: the reference the fine-tuned model must beat."),
    Stage("evaluate", "evaluate", "evaluate",
          "Scores the fine-tuned model on the held-out test split and applies the evaluation gate.", gated=True, blocking=True),
    Stage("quantize", "quantize", "quantize",
          "Post-training quantization with NVIDIA ModelOpt, calibrated on rows of the training split.", per_scheme=True),
    Stage("evaluate_quantized", "quantize", "quantize",
          "Scores the quantized model itself and gates its accuracy loss against the fine-tuned model.", gated=True, per_scheme=True),
    Stage("build_engine", "engine", "engine.build",
          "Builds the inference engine and gates its accuracy on the engine's own generations.", gated=True, per_scheme=True),
    Stage("benchmark", "benchmark", "benchmark",
          "Continuous-load benchmark of the engine: throughput, time to first token, latency percentiles.", per_scheme=True),
    Stage("select", "select", "select",
          "Chooses the production scheme by policy among the schemes that passed every gate and the latency SLO.",
          gated=True, blocking=True),
    Stage("package", "package", "package.stage",
          "Encrypts (AES-256-GCM, KMS-wrapped key), signs (Ed25519), attests (in-toto) and verifies the selected engine."),
    Stage("register", "package", "package.stage",
          "Registers the package as a new model version in the MLflow model registry, alias `candidate`."),
    Stage("backup", "package", "package.stage", "Copies the package to the backup folder and verifies the copy.", tracked=False),
    Stage("rollout", "rollout", "rollout.stage",
          "Serves the package behind the gateway and runs the canary checks (TLS 1.3, roles, generation, latency, audit).",
          gated=True, blocking=True),
    Stage("promote", "rollout", "rollout.stage",
          "Moves the registry alias `production` to the checked version; the version it replaces keeps `previous`."),
    Stage("summary", "summary", "summary",
          "Builds the pipeline summary, the DAG picture and the Snakemake report, and logs them on the pipeline run.",
          tracked=False),
)
BY_NAME = {stage.name: stage for stage in STAGES}
# Jobs that are not rules: the parent run, and the rollback command (python -m workflow.rollout rollback).
OTHER_JOBS = {
    "pipeline": "The pipeline run: one per results directory; every job is a child run.",
    "rollback": "Moves `production` back to the `previous` version and redeploys it.",
}


def description(stage: str) -> str:
    known = BY_NAME.get(stage)
    return known.description if known else OTHER_JOBS.get(stage, f"The {stage} stage.")
