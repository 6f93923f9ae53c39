"""build_engine/{scheme}: build the configured backend's engine and measure accuracy on its own generations.

    snakemake results/engine/onnxruntime/int4_awq/engine_manifest.json
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow
from transformers import AutoTokenizer

from workflow.chat import prompt_ids
from workflow import closeness
from workflow.config import Cluster, EngineConfig, EvalConfig, QuantizeConfig
from workflow.data import read_split
from workflow.engine import onnxruntime, pytorch, tensorrt_llm
from workflow.engine.calibration import CalibrationError, FoldReport, fold_calibration
from workflow.engine.runtime import load_engine
from workflow.evaluate import accuracy_gate, engine_scores, log_results
from workflow.generation import load_model, model_device
from workflow.progress import Progress
from workflow.schemes import SCHEMES
from workflow.tracking import Tracking, describe, dir_bytes, job_run, record_gate, sha256_tree

log = logging.getLogger(__name__)


def build_onnxruntime(model_dir: Path, quantized_dir: Path, engine_dir: Path, scheme: str, settings: EngineConfig, rows: list[dict],
                      tokenizer, eval_cfg: EvalConfig, log_path) -> dict | None:
    """Build the ONNX Runtime engine of scheme into engine_dir: from the fine-tuned weights with the quantize stage's
    calibration folded in, from the fine-tuned weights alone (round-to-nearest), or both, keeping the one with the
    higher score on evaluate.metric (engine.onnxruntime.calibration: calibrated | rtn | auto; ties keep calibrated).
    Returns, when both were built (or calibration could not be carried), which was kept and why, each candidate's
    accuracy, and the kept one's scores ("scored": (metrics, results))."""
    ort, mode = settings.onnxruntime, settings.onnxruntime.calibration
    source_sha256 = sha256_tree(model_dir)[0]

    def build(candidate_dir: Path, source: Path, report: FoldReport | None) -> None:
        with Progress(None, f"engine build {scheme} ({candidate_dir.name})"):
            onnxruntime.build(source, candidate_dir, scheme, ort.execution_provider, ort.block_size, ort.accuracy_level,
                              source_sha256, log_path, calibration=report)

    if SCHEMES[scheme].calibration is None or mode == "rtn":
        build(engine_dir, model_dir, None)
        return None
    work = engine_dir.parent / f".{scheme}.candidates"
    shutil.rmtree(work, ignore_errors=True)
    try:
        prompts = [prompt_ids(tokenizer, row["messages"][:-1]) for row in rows[:4]]
        try:
            report = fold_calibration(model_dir, quantized_dir, scheme, work / "folded", prompts)
        except CalibrationError as err:
            if mode == "calibrated":
                raise
            log.warning("%s; building round-to-nearest only", err)
            build(engine_dir, model_dir, None)
            return {"kept": "rtn", "reason": str(err)}
        if mode == "calibrated":
            build(engine_dir, work / "folded", report)
            return None
        build(work / "calibrated", work / "folded", report)
        build(work / "rtn", model_dir, None)
        candidates, scored = {}, {}
        for name in ("calibrated", "rtn"):
            engine = onnxruntime.OrtEngine(work / name, ort.execution_provider, ort.max_batch_size)
            metrics, results = engine_scores(engine, tokenizer, rows, eval_cfg)
            candidates[name] = {"accuracy": metrics["accuracy"], "algorithm": engine.manifest.algorithm}
            scored[name] = (metrics, results)
        kept = "calibrated" if candidates["calibrated"]["accuracy"] >= candidates["rtn"]["accuracy"] else "rtn"
        shutil.rmtree(engine_dir, ignore_errors=True)
        shutil.move(work / kept, engine_dir)
        log.info("engine %s: calibrated accuracy %.3f, round-to-nearest %.3f; kept %s", scheme,
                 candidates["calibrated"]["accuracy"], candidates["rtn"]["accuracy"], kept)
        return {"kept": kept, "candidates": candidates, "scored": scored[kept]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def with_losses(comparison: dict, baseline: float) -> dict:
    """The calibrated-vs-rtn comparison with each candidate's accuracy loss against the fine-tuned model."""
    candidates = {name: c | {"accuracy_loss": baseline - c["accuracy"]} for name, c in comparison.get("candidates", {}).items()}
    return comparison | ({"candidates": candidates} if candidates else {})


def choice_text(choice: dict | None) -> str:
    if not choice:
        return ""
    if "candidates" not in choice:
        return f" Kept round-to-nearest: {choice['reason']}."
    losses = ", ".join(f"{name} {c['accuracy_loss']:+.3f}" for name, c in choice["candidates"].items())
    return f" Accuracy loss of both builds: {losses}; kept **{choice['kept']}**."


def build_engine(model_dir: str | Path, quantized_dir: str | Path, engine_dir: str | Path, scheme: str, settings: EngineConfig,
                 test_path: str | Path, finetuned_path: str | Path, gates: QuantizeConfig, eval_cfg: EvalConfig,
                 tracking: Tracking, cluster: Cluster = Cluster()) -> dict:
    """ONNX Runtime GenAI builds from the fine-tuned model, with the quantize stage's calibration folded in (its
    builder quantizes weights itself); TensorRT-LLM builds from the ModelOpt checkpoint of the scheme; PyTorch serves the
    fine-tuned checkpoint (the baseline only). The engine is
    gated on its own generations' accuracy and on its closeness to the fine-tuned model (workflow/closeness.py)."""
    backend, engine_dir = settings.backend, Path(engine_dir)
    with job_run(tracking, f"build_engine/{scheme}", {"engine": settings.model_dump(), "scheme": scheme}):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        rows = read_split(test_path, eval_cfg.max_samples)
        comparison = None
        if backend == "onnxruntime":
            comparison = build_onnxruntime(Path(model_dir), Path(quantized_dir), engine_dir, scheme, settings, rows, tokenizer,
                                           eval_cfg, tracking.log_path)
        elif backend == "pytorch":
            pytorch.build(model_dir, engine_dir, scheme, model_device(cluster), sha256_tree(model_dir)[0])
        else:
            source = Path(quantized_dir) / "checkpoint"
            build_plan = tensorrt_llm.plan(source, engine_dir, scheme, settings.tensorrt_llm)
            log.info("TensorRT-LLM plan: %s", build_plan)
            with Progress(None, f"engine build {scheme} (TensorRT-LLM)"):
                tensorrt_llm.build(build_plan, sha256_tree(source)[0])
        if comparison and "scored" in comparison:
            metrics, results = comparison.pop("scored")
        else:
            engine = load_engine(engine_dir, settings)
            metrics, results = engine_scores(engine, tokenizer, rows, eval_cfg)
        measured = closeness.compare(closeness.model_logits(load_model(model_dir, model_device(cluster))),
                                     closeness.engine_logits(engine_dir, settings), read_split(test_path, gates.closeness_rows))
        baseline = json.loads(Path(finetuned_path).read_text())["metrics"]["accuracy"]
        accuracy = accuracy_gate(scheme, metrics["accuracy"], baseline, getattr(gates.max_accuracy_loss, scheme))
        gate, checks = closeness.scheme_gate(scheme, accuracy, measured, gates)
        size = dir_bytes(engine_dir)
        record = gate | {"format_adherence": metrics.get("format_adherence"), "engine_bytes": size,
                         "manifest": json.loads((engine_dir / "engine_manifest.json").read_text()),
                         "calibration_choice": comparison and with_losses(comparison, gate["baseline_accuracy"])}
        (engine_dir / "accuracy.json").write_text(json.dumps(record, indent=1))
        log_results(f"engine_{scheme}", metrics, results, eval_cfg.sample_generations)
        mlflow.log_metrics({"accuracy_loss": gate["accuracy_loss"], "engine_mb": size / 2**20} | closeness.metrics(measured)
                           | {f"accuracy_loss_{name}": c["accuracy_loss"] for name, c in (record["calibration_choice"] or {}).get("candidates", {}).items()})
        mlflow.set_tag("ft2prod.engine_weights", "calibrated" if record["manifest"]["calibration"] else "rtn")
        mlflow.log_dict(record["manifest"], "engine_manifest.json")
        mlflow.set_tag("ft2prod.gate_reason", gate["reason"])
        record_gate(checks)
        describe(f"{backend} engine ({record['manifest']['algorithm']}), {size / 2**20:.2f} MB: accuracy on its own generations "
                 f"**{gate['accuracy']:.3f}** (fine-tuned {gate['baseline_accuracy']:.3f}), {closeness.text(measured)}."
                 f"{choice_text(record['calibration_choice'])}\n\nGate: **{'passed' if gate['passed'] else 'failed, scheme dropped'}** — {gate['reason']}.")
        (log.info if gate["passed"] else log.warning)("engine gate: %s", gate["reason"])
        return record
