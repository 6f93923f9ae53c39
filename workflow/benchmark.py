"""benchmark/{scheme}: a continuous-load generator against a built engine.

    snakemake results/benchmark/onnxruntime/int4_awq.json

`concurrency` workers pull requests from one queue, so a new request is admitted as soon as another
finishes (continuous load, not lock-step batches). Every request has `input_len` prompt tokens (seeded
random non-special tokens, as trtllm-bench's synthetic datasets do) and must produce exactly `output_len`
tokens. Reported per concurrency level: output tokens/s (median of `repeats` runs, with their spread), requests/s,
time to first token, time per output token after the first, and p50/p95/p99 request latency (of the median run).
An ONNX Runtime engine on CPU batches the concurrent requests continuously (workflow/engine/batching.py).
"""

from __future__ import annotations

import json
import logging
import queue
import random
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from workflow.config import EngineConfig, LoadConfig
from workflow.engine.interface import GenerationRequest
from workflow.engine.runtime import load_engine
from workflow.progress import Progress
from workflow.tracking import Tracking, describe, job_run

log = logging.getLogger(__name__)

PROMPT_SEED = 0
"""Every run and every engine gets the same synthetic prompts."""


@dataclass(frozen=True)
class RequestResult:
    latency: float
    ttft: float
    output_tokens: int

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / max(1, self.output_tokens - 1)


def synthetic_prompts(vocab_size: int, special_ids: set[int], cfg: LoadConfig) -> list[list[int]]:
    rng = random.Random(PROMPT_SEED)
    ordinary = [t for t in range(vocab_size) if t not in special_ids]
    return [[rng.choice(ordinary) for _ in range(cfg.input_len)] for _ in range(cfg.requests)]


def run_level(engine, prompts: list[list[int]], output_len: int, concurrency: int,
              progress: Progress | None = None) -> tuple[list[RequestResult], float]:
    pending: queue.Queue = queue.Queue()
    for prompt in prompts:
        pending.put(prompt)
    results: list[RequestResult] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            try:
                prompt = pending.get_nowait()
            except queue.Empty:
                return
            start = time.perf_counter()
            first, count = None, 0
            for _ in engine.stream(GenerationRequest(prompt, output_len, min_new_tokens=output_len)):
                count += 1
                first = first or time.perf_counter() - start
            with lock:
                results.append(RequestResult(time.perf_counter() - start, first or 0.0, count))
            if progress:
                progress.update(1, concurrency=concurrency)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - began


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(results: list[RequestResult], wall: float, concurrency: int) -> dict:
    latencies = [r.latency for r in results]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens_per_s": sum(r.output_tokens for r in results) / wall,
        "requests_per_s": len(results) / wall,
        "ttft_p50_s": percentile([r.ttft for r in results], 50),
        "ttft_p95_s": percentile([r.ttft for r in results], 95),
        "tpot_p50_s": percentile([r.tpot for r in results], 50),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_p99_s": percentile(latencies, 99),
        "output_tokens_per_request": statistics.mean(r.output_tokens for r in results),
    }


def measure(engine, vocab_size: int, special_ids: set[int], cfg: LoadConfig) -> tuple[list[dict], dict[int, list[float]]]:
    """Summaries per concurrency level, and every request latency per level (for the distribution plot)."""
    if cfg.repeats < 1:
        raise ValueError(f"benchmark.repeats must be at least 1 (got {cfg.repeats})")
    prompts = synthetic_prompts(vocab_size, special_ids, cfg)
    run_level(engine, prompts[:1], cfg.output_len, 1)  # warm-up: first-run allocations stay out of the numbers
    with Progress(len(cfg.concurrency) * cfg.repeats * len(prompts), "benchmark", unit="request") as shown:
        return measure_levels(engine, prompts, cfg, shown)


def measure_levels(engine, prompts: list[list[int]], cfg: LoadConfig, shown: Progress) -> tuple[list[dict], dict[int, list[float]]]:
    """Each concurrency level cfg.repeats times; the median run's summary and latencies per level."""
    levels, latencies = [], {}
    for concurrency in cfg.concurrency:
        runs = []
        for _ in range(cfg.repeats):
            results, wall = run_level(engine, prompts, cfg.output_len, concurrency, shown)
            runs.append((summarize(results, wall, concurrency), results))
        runs.sort(key=lambda run: run[0]["output_tokens_per_s"])
        median, results = runs[len(runs) // 2]
        speeds = [run[0]["output_tokens_per_s"] for run in runs]
        levels.append(median | {"output_tokens_per_s_runs": speeds, "output_tokens_per_s_spread": speeds[-1] - speeds[0]})
        latencies[concurrency] = [r.latency for r in results]
        log.info("concurrency %d: %s", concurrency, json.dumps(levels[-1]))
    return levels, latencies


def plot(levels: list[dict], latencies: dict[int, list[float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for concurrency, values in latencies.items():
        left.hist(values, bins=20, alpha=0.6, label=f"concurrency {concurrency}")
    left.set_xlabel("request latency (s)")
    left.set_ylabel("requests")
    left.legend()
    right.plot([lv["concurrency"] for lv in levels], [lv["output_tokens_per_s"] for lv in levels], "o-")
    right.set_xlabel("concurrency")
    right.set_ylabel("output tokens/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def benchmark(engine_dir: str | Path, tokenizer_dir: str | Path, out_path: str | Path, scheme: str, settings: EngineConfig,
              cfg: LoadConfig, tracking: Tracking) -> dict:
    from transformers import AutoTokenizer

    out_path = Path(out_path)
    with job_run(tracking, f"benchmark/{scheme}", {"benchmark": cfg.model_dump(), "backend": settings.backend}):
        engine = load_engine(engine_dir, settings)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        levels, latencies = measure(engine, len(tokenizer), set(tokenizer.all_special_ids), cfg)
        record = {"scheme": scheme, "backend": settings.backend, "manifest": engine.manifest.precision,
                  "algorithm": engine.manifest.algorithm, "max_batch_size": engine.max_batch_size,
                  "load": cfg.model_dump(), "levels": levels}
        out_path.write_text(json.dumps(record, indent=1))
        figure = out_path.with_suffix(".png")
        plot(levels, latencies, f"{scheme} on {settings.backend} (input {cfg.input_len}, output {cfg.output_len})", figure)
        mlflow.log_artifact(str(figure))
        mlflow.log_dict(record, "benchmark.json")
        for level in levels:
            mlflow.log_metrics({k: v for k, v in level.items() if k not in ("concurrency", "output_tokens_per_s_runs")},
                               step=level["concurrency"])
        describe(f"{scheme} on {settings.backend}, input {cfg.input_len} / output {cfg.output_len} tokens, {cfg.requests} requests per level:\n\n"
                 + "\n".join(f"- concurrency {lv['concurrency']}: **{lv['output_tokens_per_s']:.1f}** output tokens/s "
                              f"(spread {lv['output_tokens_per_s_spread']:.1f} over {cfg.repeats} runs), "
                              f"p95 latency {lv['latency_p95_s']:.3f} s" for lv in levels))
        return record
