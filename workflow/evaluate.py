"""evaluate: accuracy on evaluate.metric, format adherence and perplexity on the held-out test split, and the gate.

    snakemake results/evaluate/finetuned.json

Generation is greedy, from the prompt the model's own chat template renders (workflow.chat.prompt_ids). The answer is
the text after the last </think> (the whole text for a model that does not think), up to EOS, scored against the
reference answer by evaluate.metric (workflow.metrics: exact after normalisation, contains, regex, the user's scorer;
or an lm-evaluation-harness task, workflow.harness). Format adherence means the think block (if any) was closed and
the generation ended with EOS rather than running out of tokens. Truncated thinking counts the generations that hit
max_new_tokens before closing the think block, the most common silent failure when evaluating R1-style models: raise
evaluate.max_new_tokens when it is not zero. The test split is the random one, or evaluate.path's rows.
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
from transformers import AutoTokenizer

from workflow import generation, harness
from workflow.capacity import Architecture, generation_memory
from workflow.chat import prompt_ids
from workflow.config import Cluster, EvalConfig
from workflow.data import read_split
from workflow.engine.interface import Engine, GenerationRequest
from workflow.generation import Journal, cache_length, fitted_batch, journal_key, load_model, model_device, peak_gib
from workflow.metrics import Grader, grader, label
from workflow.progress import Progress
from workflow.tracking import GateFailed, Tracking, describe, job_run, record_gate

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Completion:
    text: str
    """Generated text after the prompt, special tokens removed."""
    ended: bool
    """The generation stopped at EOS (not at the token budget)."""


def score(rows: list[dict], completions: list[Completion], grading: Grader) -> tuple[dict, list[dict]]:
    """The mean score on the grader's metric ("accuracy"), format adherence and truncated thinking of completions
    against the rows' reference answers, and per-row results."""
    results = []
    for row, completion in zip(rows, completions, strict=True):
        reference = row["answer"].strip()
        answer = grading.answer(completion.text)
        value = grading.score(answer, reference)
        results.append({
            "prompt": row["messages"][-2]["content"] if len(row["messages"]) > 1 else "",
            "reference": reference,
            "generation": completion.text,
            "answer": answer,
            "score": value,
            "correct": value >= 1.0,
            "well_formed": answer is not None and completion.ended,
            "truncated_thinking": answer is None and not completion.ended,
        })
    n = len(results)
    metrics = {
        "accuracy": sum(r["score"] for r in results) / n,
        "format_adherence": sum(r["well_formed"] for r in results) / n,
        "truncated_thinking": sum(r["truncated_thinking"] for r in results) / n,
        "samples": n,
    }
    return metrics, results


def eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a generation: the tokenizer's EOS and any the model's generation config adds."""
    extra = model.generation_config.eos_token_id
    return {tokenizer.eos_token_id} | set(extra if isinstance(extra, list) else [extra] if extra is not None else [])


def gpu_batch(model, prompts: list[list[int]], cfg: EvalConfig, cluster: Cluster) -> tuple[int, dict | None]:
    """Prompts generated together: cfg.batch_size on the CPU; on a GPU the most the planner's memory model fits
    (workflow.capacity.generation_memory), with that model's figure for the job."""
    if model.device.type != "cuda":
        return cfg.batch_size, None
    arch = Architecture.from_hf_config(model.config.to_dict())
    cache_len, longest = cache_length(prompts, cfg.max_new_tokens), max(map(len, prompts))
    batch = fitted_batch(arch, cluster, cache_len, longest, model.dtype.itemsize, len(prompts))
    return batch, generation_memory(arch, batch, cache_len, longest, model.dtype.itemsize, cluster)


def planned_figures(planned: dict) -> dict:
    """The planner's figure for what the job's tensors hold (what torch.cuda.max_memory_allocated measures: the CUDA
    context and the allocator's slack, cluster.overhead_gib, are outside it), and that overhead."""
    overhead = planned["per_device_gib"]["overhead"]
    return {"gpu_planned_gib": round(planned["device_gib"] - overhead, 4), "gpu_overhead_gib": overhead}


def generate(model, tokenizer, rows: list[dict], cfg: EvalConfig, cluster: Cluster = Cluster(),
             journal_path: str | Path | None = None, static_cache: bool = True) -> tuple[list[Completion], dict | None]:
    """Greedy completions of each row's prompt (the conversation up to its last answer), batched as gpu_batch says,
    on a GPU with a static KV cache unless `static_cache` is off (ModelOpt's fake-quantized modules are not
    compiled), each finished prompt journalled to `journal_path` so a killed job resumes; and the planner's memory
    figure on a GPU."""
    prompts = [prompt_ids(tokenizer, r["messages"][:-1]) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch, planned = gpu_batch(model, prompts, cfg, cluster)
    static = static_cache and planned is not None
    log.info("generating %d prompts on %s, %d at a time%s", len(prompts), model.device, batch,
             f" (planner: {planned['device_gib']} GiB of {planned['device_limit_gib']})" if planned else "")
    journal = Journal(journal_path, journal_key(model.name_or_path, prompts, cfg.max_new_tokens, f"{model.dtype}{static}"))
    generated = generation.generate(model, prompts, cfg.max_new_tokens, batch, pad, eos_ids(model, tokenizer), journal,
                                    static_cache=static)
    return [Completion(tokenizer.decode(tokens, skip_special_tokens=True), ended) for tokens, ended in generated], planned


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
    with Progress(len(prompts), "engine generation", unit="prompt") as shown, ThreadPoolExecutor(engine.max_batch_size) as pool:
        generated = list(shown.counted(pool.map(generate, prompts)))
    return [Completion(tokenizer.decode(tokens, skip_special_tokens=True), ended) for tokens, ended in generated]


def engine_scores(engine, tokenizer, rows: list[dict], cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """A built engine's scores on evaluate.metric: its greedy answers to rows, or the lm_eval task run through it."""
    if cfg.metric == "lm_eval":
        return harness.run_task(harness.engine_model(engine, tokenizer), cfg)
    return score(rows, engine_completions(engine, tokenizer, rows, cfg.max_new_tokens), grader(cfg, tokenizer, rows))


@torch.inference_mode()
def perplexity(model, rows: list[dict]) -> float:
    """exp of the mean negative log-likelihood of the reference assistant tokens."""
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]], device=model.device)
        labels = torch.tensor([row["labels"]], device=model.device)
        n = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    return math.exp(total / count)


def evaluate_model(model_dir: str | Path, test_path: str | Path, cfg: EvalConfig, model=None, cluster: Cluster = Cluster(),
                   journal_path: str | Path | None = None) -> tuple[dict, list[dict]]:
    """Scores of the model in model_dir (or of `model`, e.g. a quantized one, with model_dir's tokenizer) on
    evaluate.metric and its perplexity on the test split's reference answers, on the GPU when the cluster has one
    (workflow.generation), with the job's device and peak GPU memory in the metrics."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    quantized = model is not None and any("quantizer" in name for name, _ in model.named_modules())
    if model is None:
        model = load_model(model_dir, model_device(cluster))
    rows = read_split(test_path, cfg.max_samples)
    if cfg.metric == "lm_eval":
        metrics, results = harness.run_task(harness.hf_model(model, tokenizer, cfg.batch_size), cfg)
        planned = None
    else:
        completions, planned = generate(model, tokenizer, rows, cfg, cluster, journal_path, static_cache=not quantized)
        metrics, results = score(rows, completions, grader(cfg, tokenizer, rows))
    metrics["perplexity"] = perplexity(model, rows)
    if planned:
        metrics |= planned_figures(planned) | {"gpu_peak_gib": peak_gib(model.device), "gpu_batch": planned["batch"]}
    if journal_path:
        Path(journal_path).unlink(missing_ok=True)
    return metrics, results


def share(metrics: dict, key: str) -> str:
    """A share of the generations, or n/a where the metric does not measure it (lm_eval tasks)."""
    return f"{metrics[key]:.3f}" if key in metrics else "n/a"


def journal_for(out_path: str | Path) -> Path:
    """Where a job's finished generations are kept until it ends: beside its output, not an output itself (Snakemake
    deletes a failed job's outputs; the journal must outlive the job)."""
    return Path(out_path).with_name(Path(out_path).stem + ".partial.jsonl")


def samples_markdown(results: list[dict], limit: int) -> str:
    lines = ["| prompt | reference | answer | score | generation |", "| --- | --- | --- | --- | --- |"]
    for r in results[:limit]:
        cells = [r["prompt"], r["reference"], r["answer"] if r["answer"] is not None else "(no </think>)",
                 f"{r['score']:g}", r["generation"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", "<br>") for c in cells) + " |")
    return "\n".join(lines)


def log_results(name: str, metrics: dict, results: list[dict], limit: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    mlflow.log_table({key: [r[key] for r in results] for key in results[0]}, f"{name}_generations.json")
    mlflow.log_text(samples_markdown(results, limit), f"{name}_samples.md")


def evaluate_base(model_dir: str | Path, test_path: str | Path, out_path: str | Path, cfg: EvalConfig, tracking: Tracking,
                  cluster: Cluster = Cluster()) -> dict:
    """The base model's scores, the reference the fine-tuned model must beat."""
    with job_run(tracking, "evaluate_base", {"evaluate": cfg.model_dump(), "model": str(model_dir)}):
        metrics, results = evaluate_model(model_dir, test_path, cfg, cluster=cluster, journal_path=journal_for(out_path))
        log_results("base", metrics, results, cfg.sample_generations)
        Path(out_path).write_text(json.dumps({"metrics": metrics, "results": results}, indent=1))
        describe(f"Base model: {label(cfg)} **{metrics['accuracy']:.3f}**, format adherence {share(metrics, 'format_adherence')}, "
                 f"perplexity {metrics['perplexity']:.2f} on {metrics['samples']} evaluation rows.")
        log.info("base model: %s", json.dumps(metrics))
        return metrics


def gate_failures(metrics: dict, base: dict, gate, metric: str) -> list[str]:
    """What the fine-tuned model misses of evaluate.gate, each naming the metric, its value and the threshold."""
    failures = []
    if metrics["accuracy"] < gate.min_accuracy:
        failures.append(f"{metric} {metrics['accuracy']:.3f} < evaluate.gate.min_accuracy {gate.min_accuracy:.3f}")
    gain = metrics["accuracy"] - base["accuracy"]
    if gain < gate.min_gain:
        failures.append(f"gain over base on {metric} {gain:+.3f} (base {base['accuracy']:.3f} -> {metrics['accuracy']:.3f}) "
                        f"< evaluate.gate.min_gain {gate.min_gain:.3f}")
    return failures


def report_markdown(metrics: dict, base: dict, results: list[dict], cfg: EvalConfig, verdict: str) -> str:
    rows = [f"| {name} | {m['accuracy']:.3f} | {share(m, 'format_adherence')} | {share(m, 'truncated_thinking')} | "
            f"{m['perplexity']:.2f} |" for name, m in (("base", base), ("fine-tuned", metrics))]
    return "\n".join([
        "# Evaluation on the held-out test split",
        "",
        f"Metric: **{label(cfg)}** on {metrics['samples']} rows.",
        "",
        "| model | score | format adherence | truncated thinking | perplexity |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Truncated thinking: generations that reached evaluate.max_new_tokens ({cfg.max_new_tokens}) before `</think>`; "
        "raise it if this is not zero.",
        "",
        f"Gate on {label(cfg)} (min {cfg.gate.min_accuracy}, min gain {cfg.gate.min_gain}): **{verdict}**",
        "",
        "## Sample generations",
        "",
        samples_markdown(results, cfg.sample_generations),
    ]) + "\n"


def evaluate(model_dir: str | Path, test_path: str | Path, base_path: str | Path, out_path: str | Path,
                       report_path: str | Path, cfg: EvalConfig, tracking: Tracking, cluster: Cluster = Cluster()) -> dict:
    """Score the fine-tuned model, compare with the base, write the report, and stop the DAG if cfg.gate fails."""
    gate, metric = cfg.gate, label(cfg)
    base = json.loads(Path(base_path).read_text())["metrics"]
    with job_run(tracking, "evaluate", {"evaluate": cfg.model_dump(), "model": str(model_dir)}):
        metrics, results = evaluate_model(model_dir, test_path, cfg, cluster=cluster, journal_path=journal_for(out_path))
        gain = metrics["gain_over_base"] = metrics["accuracy"] - base["accuracy"]
        log_results("finetuned", metrics, results, cfg.sample_generations)
        mlflow.log_metrics({f"base_{k}": float(v) for k, v in base.items()})
        mlflow.set_tag("ft2prod.metric", metric)
        failures = gate_failures(metrics, base, gate, metric)
        verdict = "failed: " + "; ".join(failures) if failures else "passed"
        Path(report_path).write_text(report_markdown(metrics, base, results, cfg, verdict))
        mlflow.log_artifact(str(report_path))
        record_gate([
            {"name": "accuracy >= evaluate.gate.min_accuracy", "passed": metrics["accuracy"] >= gate.min_accuracy,
             "value": metrics["accuracy"], "threshold": gate.min_accuracy, "detail": f"{metric} on the test split"},
            {"name": "gain over base >= evaluate.gate.min_gain", "passed": gain >= gate.min_gain, "value": gain,
             "threshold": gate.min_gain, "detail": f"{metric}: base {base['accuracy']:.3f} -> fine-tuned {metrics['accuracy']:.3f}"},
        ])
        describe(f"Fine-tuned {metric} **{metrics['accuracy']:.3f}** (base {base['accuracy']:.3f}, gain {gain:+.3f}), format "
                 f"adherence {share(metrics, 'format_adherence')}, truncated thinking {share(metrics, 'truncated_thinking')}, "
                 f"perplexity {metrics['perplexity']:.2f}.\n\nGate (min {gate.min_accuracy}, min gain {gate.min_gain}): **{verdict}**.")
        log.info("fine-tuned model: %s; gate %s", json.dumps(metrics), verdict)
        if failures:
            raise GateFailed(f"evaluate gate {verdict}")
        Path(out_path).write_text(json.dumps({"metrics": metrics, "base": base, "metric": metric, "gate": "passed"}, indent=1))
        return metrics


def accuracy_gate(scheme: str, accuracy: float, baseline: float, max_loss: float) -> dict:
    """A scheme passes when it loses at most max_loss of the evaluate.metric score (absolute) against the fine-tuned model."""
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
