"""evaluate: exact-match accuracy, format adherence and perplexity on the held-out test split, and the gate.

    snakemake results/evaluate/finetuned.json

Generation is greedy, from the prompt the model's own chat template renders (workflow.chat.prompt_ids). The answer is
the text after the last </think>, up to EOS; it must equal the reference answer exactly (whitespace trimmed). Format
adherence means the think block was closed and the generation ended with EOS rather than running out of tokens.
Truncated thinking counts the generations that hit max_new_tokens before closing the think block, the most common
silent failure when evaluating R1-style models: raise evaluate.max_new_tokens when it is not zero.
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workflow.chat import prompt_ids
from workflow.config import EvalConfig
from workflow.data import read_split
from workflow.engine.interface import Engine, GenerationRequest
from workflow.tracking import Tracking, describe, job_run, record_gate

log = logging.getLogger(__name__)

END_THINK = "</think>"


class GateFailed(RuntimeError):
    """A model (or scheme) missed a threshold; the message names the metric, its value and the threshold."""


@dataclass(frozen=True)
class Completion:
    text: str
    """Generated text after the prompt, special tokens removed."""
    ended: bool
    """The generation stopped at EOS (not at the token budget)."""


def final_answer(text: str) -> str | None:
    """The text after the last </think>, or None if the think block was never closed."""
    return text.rsplit(END_THINK, 1)[1].strip() if END_THINK in text else None


def score(rows: list[dict], completions: list[Completion]) -> tuple[dict, list[dict]]:
    """Accuracy and format adherence of completions against the rows' reference answers, and per-row results."""
    results = []
    for row, completion in zip(rows, completions, strict=True):
        reference = row["answer"].strip()
        answer = final_answer(completion.text)
        results.append({
            "prompt": row["messages"][-2]["content"] if len(row["messages"]) > 1 else "",
            "reference": reference,
            "generation": completion.text,
            "answer": answer,
            "correct": answer == reference,
            "well_formed": answer is not None and completion.ended,
            "truncated_thinking": answer is None and not completion.ended,
        })
    n = len(results)
    metrics = {
        "accuracy": sum(r["correct"] for r in results) / n,
        "format_adherence": sum(r["well_formed"] for r in results) / n,
        "truncated_thinking": sum(r["truncated_thinking"] for r in results) / n,
        "samples": n,
    }
    return metrics, results


@torch.inference_mode()
def generate(model, tokenizer, rows: list[dict], cfg: EvalConfig) -> list[Completion]:
    """Greedy completions of each row's prompt (the conversation up to its last answer), batched."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # Llama-3 tokenizers have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    completions = []
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start : start + cfg.batch_size]
        inputs = tokenizer.pad({"input_ids": [prompt_ids(tokenizer, r["messages"][:-1]) for r in batch]}, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=pad)
        for tokens in out[:, inputs.input_ids.shape[1] :].tolist():
            ended = tokenizer.eos_token_id in tokens
            if ended:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            completions.append(Completion(tokenizer.decode(tokens, skip_special_tokens=True), ended))
    return completions


def engine_completions(engine: Engine, tokenizer, rows: list[dict], max_new_tokens: int) -> list[Completion]:
    """Greedy completions from a built engine's own generation loop, as many rows at a time as the engine batches
    (`max_batch_size`); in the rows' order. The tokenizer is used
    from this thread only (a fast tokenizer shared between threads can fail with "Already borrowed")."""
    def generate(ids: list[int]) -> tuple[list[int], bool]:
        tokens = []
        for token in engine.stream(GenerationRequest(ids, max_new_tokens)):
            if token == tokenizer.eos_token_id:
                return tokens, True
            tokens.append(token)
        return tokens, False

    prompts = [prompt_ids(tokenizer, row["messages"][:-1]) for row in rows]
    with ThreadPoolExecutor(engine.max_batch_size) as pool:
        generated = list(pool.map(generate, prompts))
    return [Completion(tokenizer.decode(tokens, skip_special_tokens=True), ended) for tokens, ended in generated]


@torch.inference_mode()
def perplexity(model, rows: list[dict]) -> float:
    """exp of the mean negative log-likelihood of the reference assistant tokens."""
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    return math.exp(total / count)


def evaluate_model(model_dir: str | Path, test_path: str | Path, cfg: EvalConfig, model=None) -> tuple[dict, list[dict]]:
    """Scores of the model in model_dir (or of `model`, e.g. a quantized one, with model_dir's tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = read_split(test_path, cfg.max_samples)
    metrics, results = score(rows, generate(model, tokenizer, rows, cfg))
    metrics["perplexity"] = perplexity(model, rows)
    return metrics, results


def samples_markdown(results: list[dict], limit: int) -> str:
    lines = ["| prompt | reference | answer | correct | generation |", "| --- | --- | --- | --- | --- |"]
    for r in results[:limit]:
        cells = [r["prompt"], r["reference"], r["answer"] or "(no </think>)", "yes" if r["correct"] else "no", r["generation"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", "<br>") for c in cells) + " |")
    return "\n".join(lines)


def log_results(name: str, metrics: dict, results: list[dict], limit: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    mlflow.log_table({key: [r[key] for r in results] for key in results[0]}, f"{name}_generations.json")
    mlflow.log_text(samples_markdown(results, limit), f"{name}_samples.md")


def evaluate_base(model_dir: str | Path, test_path: str | Path, out_path: str | Path, cfg: EvalConfig, tracking: Tracking) -> dict:
    """The base model's scores, the reference the fine-tuned model must beat."""
    with job_run(tracking, "evaluate_base", {"evaluate": cfg.model_dump(), "model": str(model_dir)}):
        metrics, results = evaluate_model(model_dir, test_path, cfg)
        log_results("base", metrics, results, cfg.sample_generations)
        Path(out_path).write_text(json.dumps({"metrics": metrics, "results": results}, indent=1))
        describe(f"Base model: accuracy **{metrics['accuracy']:.3f}**, format adherence {metrics['format_adherence']:.3f}, "
                 f"perplexity {metrics['perplexity']:.2f} on {cfg.max_samples} test rows at most.")
        log.info("base model: %s", json.dumps(metrics))
        return metrics


def gate_failures(metrics: dict, base: dict, min_accuracy: float, min_gain: float) -> list[str]:
    failures = []
    if metrics["accuracy"] < min_accuracy:
        failures.append(f"accuracy {metrics['accuracy']:.3f} < evaluate.gate.min_accuracy {min_accuracy:.3f}")
    gain = metrics["accuracy"] - base["accuracy"]
    if gain < min_gain:
        failures.append(
            f"gain over base {gain:+.3f} (base {base['accuracy']:.3f} -> {metrics['accuracy']:.3f}) < evaluate.gate.min_gain {min_gain:.3f}"
        )
    return failures


def evaluate(model_dir: str | Path, test_path: str | Path, base_path: str | Path, out_path: str | Path,
                       report_path: str | Path, cfg: EvalConfig, tracking: Tracking) -> dict:
    """Score the fine-tuned model, compare with the base, write the report, and stop the DAG if cfg.gate fails."""
    gate = cfg.gate
    base = json.loads(Path(base_path).read_text())["metrics"]
    with job_run(tracking, "evaluate", {"evaluate": cfg.model_dump(), "model": str(model_dir)}):
        metrics, results = evaluate_model(model_dir, test_path, cfg)
        metrics["gain_over_base"] = metrics["accuracy"] - base["accuracy"]
        log_results("finetuned", metrics, results, cfg.sample_generations)
        mlflow.log_metrics({f"base_{k}": float(v) for k, v in base.items()})
        failures = gate_failures(metrics, base, gate.min_accuracy, gate.min_gain)
        verdict = "failed: " + "; ".join(failures) if failures else "passed"
        report = "\n".join([
            "# Evaluation on the held-out test split",
            "",
            "| model | accuracy | format adherence | truncated thinking | perplexity |",
            "| --- | --- | --- | --- | --- |",
            f"| base | {base['accuracy']:.3f} | {base['format_adherence']:.3f} | {base.get('truncated_thinking', 0):.3f} | {base['perplexity']:.2f} |",
            f"| fine-tuned | {metrics['accuracy']:.3f} | {metrics['format_adherence']:.3f} | {metrics['truncated_thinking']:.3f} | {metrics['perplexity']:.2f} |",
            "",
            f"Truncated thinking: generations that reached evaluate.max_new_tokens ({cfg.max_new_tokens}) before `</think>`; "
            "raise it if this is not zero.",
            "",
            f"Gate (min accuracy {gate.min_accuracy}, min gain {gate.min_gain}): **{verdict}**",
            "",
            "## Sample generations",
            "",
            samples_markdown(results, cfg.sample_generations),
        ])
        Path(report_path).write_text(report + "\n")
        mlflow.log_artifact(str(report_path))
        gain = metrics["gain_over_base"]
        record_gate([
            {"name": "accuracy >= evaluate.gate.min_accuracy", "passed": metrics["accuracy"] >= gate.min_accuracy,
             "value": metrics["accuracy"], "threshold": gate.min_accuracy, "detail": "exact-match accuracy on the test split"},
            {"name": "gain over base >= evaluate.gate.min_gain", "passed": gain >= gate.min_gain, "value": gain,
             "threshold": gate.min_gain, "detail": f"base {base['accuracy']:.3f} -> fine-tuned {metrics['accuracy']:.3f}"},
        ])
        describe(f"Fine-tuned accuracy **{metrics['accuracy']:.3f}** (base {base['accuracy']:.3f}, gain {gain:+.3f}), format adherence "
                 f"{metrics['format_adherence']:.3f}, truncated thinking {metrics['truncated_thinking']:.3f}, perplexity {metrics['perplexity']:.2f}.\n\nGate (min accuracy {gate.min_accuracy}, "
                 f"min gain {gate.min_gain}): **{verdict}**.")
        log.info("fine-tuned model: %s; gate %s", json.dumps(metrics), verdict)
        if failures:
            raise GateFailed(f"evaluate gate {verdict}")
        Path(out_path).write_text(json.dumps({"metrics": metrics, "base": base, "gate": "passed"}, indent=1))
        return metrics


def accuracy_gate(scheme: str, accuracy: float, baseline: float, max_loss: float) -> dict:
    """A scheme passes when it loses at most max_loss accuracy (absolute) against the fine-tuned model."""
    loss = baseline - accuracy
    passed = loss <= max_loss + 1e-9
    reason = (
        f"{scheme}: accuracy loss {loss:+.3f} ({baseline:.3f} -> {accuracy:.3f}) "
        f"{'<=' if passed else '>'} quantize.max_accuracy_loss.{scheme} {max_loss:.3f}"
    )
    return {"scheme": scheme, "accuracy": accuracy, "baseline_accuracy": baseline, "accuracy_loss": loss,
            "max_accuracy_loss": max_loss, "passed": passed, "reason": reason}


def gate_check(gate: dict, key: str) -> dict:
    """An accuracy_gate result as a check of record_gate."""
    return {"name": f"accuracy loss <= {key}", "passed": gate["passed"], "value": gate["accuracy_loss"],
            "threshold": gate["max_accuracy_loss"], "detail": gate["reason"]}
