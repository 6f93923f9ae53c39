"""build_engine/{scheme}: build the configured backend's engine and measure accuracy on its own generations.

    snakemake results/engine/onnxruntime/int4_awq/engine_manifest.json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
from transformers import AutoTokenizer

from workflow.config import EvalConfig, TrtllmSettings
from workflow.data import read_split
from workflow.engine import onnxruntime, tensorrt_llm
from workflow.evaluate import (
    accuracy_gate,
    engine_completions,
    gate_check,
    log_results,
    score,
)
from workflow.tracking import (
    Tracking,
    describe,
    dir_bytes,
    job_run,
    record_gate,
    sha256_tree,
)

log = logging.getLogger(__name__)


def load_engine(engine_dir: str | Path, backend: str, settings: dict):
    """The engine in engine_dir, refused unless its manifest matches this machine."""
    if backend == "onnxruntime":
        return onnxruntime.OrtEngine(engine_dir, settings["onnxruntime"]["execution_provider"])
    return tensorrt_llm.TrtllmEngine(engine_dir)


def build_engine(model_dir: str | Path, quantized_dir: str | Path, engine_dir: str | Path, scheme: str, settings: dict,
                 test_path: str | Path, finetuned_path: str | Path, max_loss: float, eval_cfg: EvalConfig,
                 tracking: Tracking) -> dict:
    """ONNX Runtime GenAI builds from the fine-tuned model (its builder quantizes weights itself);
    TensorRT-LLM builds from the ModelOpt checkpoint of the scheme."""
    backend, engine_dir = settings["backend"], Path(engine_dir)
    with job_run(tracking, f"build_engine/{scheme}", {"engine": settings, "scheme": scheme}):
        if backend == "onnxruntime":
            ort = settings["onnxruntime"]
            source = Path(model_dir)
            onnxruntime.build(source, engine_dir, scheme, ort["execution_provider"], ort["block_size"],
                              ort["accuracy_level"], sha256_tree(source)[0], tracking.log_path)
        else:
            source = Path(quantized_dir) / "checkpoint"
            build_plan = tensorrt_llm.plan(source, engine_dir, scheme, TrtllmSettings(**settings["tensorrt_llm"]))
            log.info("TensorRT-LLM plan: %s", build_plan)
            tensorrt_llm.build(build_plan, sha256_tree(source)[0])
        engine = load_engine(engine_dir, backend, settings)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        rows = read_split(test_path, eval_cfg.max_samples)
        metrics, results = score(rows, engine_completions(engine, tokenizer, rows, eval_cfg.max_new_tokens))
        baseline = json.loads(Path(finetuned_path).read_text())["metrics"]["accuracy"]
        gate = accuracy_gate(scheme, metrics["accuracy"], baseline, max_loss)
        size = dir_bytes(engine_dir)
        record = gate | {"format_adherence": metrics["format_adherence"], "engine_bytes": size,
                         "manifest": json.loads((engine_dir / "engine_manifest.json").read_text())}
        (engine_dir / "accuracy.json").write_text(json.dumps(record, indent=1))
        log_results(f"engine_{scheme}", metrics, results, eval_cfg.sample_generations)
        mlflow.log_metrics({"accuracy_loss": gate["accuracy_loss"], "engine_mb": size / 2**20})
        mlflow.log_dict(record["manifest"], "engine_manifest.json")
        mlflow.set_tag("ft2prod.gate_reason", gate["reason"])
        record_gate([gate_check(gate, f"quantize.max_accuracy_loss.{scheme}")])
        describe(f"{backend} engine ({record['manifest']['precision']}), {size / 2**20:.2f} MB: accuracy on its own generations "
                 f"**{gate['accuracy']:.3f}** (fine-tuned {baseline:.3f}).\n\nGate: **{'passed' if gate['passed'] else 'failed, scheme dropped'}** — {gate['reason']}.")
        (log.info if gate["passed"] else log.warning)("engine accuracy gate: %s", gate["reason"])
        return record
