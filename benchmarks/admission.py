"""Wall time of one load level when requests are admitted as others finish (workflow.benchmark.run_level), against
lock-step batches and the slowest request alone, all measured in this run on this machine.

    .venv/bin/python benchmarks/admission.py [--repeats 7]

The level: one slow request (8 tokens at 50 ms) and three fast ones (8 tokens at 10 ms) on 2 workers, with a
stand-in engine that only sleeps. Admitting as others finish runs the fast ones back to back beside the slow one,
so the level takes about as long as the slow request alone (0.40 s); lock-step batches of 2 wait for the slow
request before starting the next pair (0.48 s). The numbers move with the machine's load: compare the columns
of one run, not runs on different machines. (This replaces a `wall < 0.46` assert that flaked on busy machines.)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time

from workflow.benchmark import run_level
from workflow.engine.interface import GenerationRequest

SLOW, FAST = [1], [2]
PROMPTS = [SLOW, FAST, FAST, FAST]
TOKENS, WORKERS = 8, 2


class SleepingEngine:
    """A stand-in with known per-token times: 50 ms for the slow prompt, 10 ms for the fast ones."""

    def stream(self, request: GenerationRequest):
        for _ in range(request.max_new_tokens):
            time.sleep(0.05 if list(request.prompt_ids) == SLOW else 0.01)
            yield 0


def lock_step(engine, prompts: list[list[int]], output_len: int, batch: int) -> float:
    """The baseline: batches of `batch` requests, each batch waiting for its slowest request."""
    began = time.perf_counter()
    for start in range(0, len(prompts), batch):
        threads = [threading.Thread(target=lambda p=p: list(engine.stream(GenerationRequest(p, output_len, output_len))))
                   for p in prompts[start : start + batch]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return time.perf_counter() - began


def alone(engine, prompt: list[int], output_len: int) -> float:
    began = time.perf_counter()
    list(engine.stream(GenerationRequest(prompt, output_len, output_len)))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each; the median is reported")
    args = parser.parse_args()
    engine = SleepingEngine()
    walls: dict[str, list[float]] = {"slow request alone": [], "admitted as others finish": [], "lock-step batches": []}
    for _ in range(args.repeats):  # interleaved, so a burst of load on the machine hits every column
        walls["slow request alone"].append(alone(engine, SLOW, TOKENS))
        walls["admitted as others finish"].append(run_level(engine, PROMPTS, TOKENS, concurrency=WORKERS)[1])
        walls["lock-step batches"].append(lock_step(engine, PROMPTS, TOKENS, batch=WORKERS))
    print(f"# {platform.node()}, {platform.processor() or platform.machine()}; 1 slow + 3 fast requests, {WORKERS} workers, "
          f"median of {args.repeats}")
    print("| schedule | wall s (median) | min | max | vs slow request alone |")
    print("| --- | --- | --- | --- | --- |")
    reference = statistics.median(walls["slow request alone"])
    for name, values in walls.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {max(values):.3f} | {median / reference:.2f}x |")


if __name__ == "__main__":
    main()
