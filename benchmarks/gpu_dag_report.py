"""The job table of a DAG run: wall time, device and, for GPU jobs, the planner's memory figure beside the peak.

    python benchmarks/gpu_dag_report.py results      (after benchmarks/gpu_dag.sh; reads $OUT/snakemake.log too)

Times come from Snakemake's log (job start to "Finished jobid"), the device from each job's `gpu` resource,
the planner's figures and measured peaks from what the jobs wrote: evaluation and quantization results
(gpu_planned_gib, gpu_peak_gib) and the fine-tune's speed record (predicted_peak_gib, peak_memory_gib).
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3}\s+\d+ \d\d:\d\d:\d\d \d{4})\]")


def jobs(log_text: str) -> list[dict]:
    """Jobs in start order: rule, wildcards, gpu, start and end times."""
    table, by_id, now, current = [], {}, None, None
    for line in log_text.splitlines():
        if m := STAMP.match(line):
            now = datetime.strptime(re.sub(r"\s+", " ", m.group(1)), "%a %b %d %H:%M:%S %Y")
        elif m := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line.strip()):
            current = {"rule": m.group(1), "wildcards": "", "gpu": 0, "start": now, "end": None}
        elif current and (m := re.match(r"^\s+jobid: (\d+)", line)):
            by_id[m.group(1)] = current
            table.append(current)
        elif current and (m := re.match(r"^\s+wildcards: (.*)", line)):
            current["wildcards"] = m.group(1)
        elif current and (m := re.search(r"\bgpu=(\d+)", line)) and line.strip().startswith("resources:"):
            current["gpu"] = int(m.group(1))
        elif m := re.search(r"Finished jobid: (\d+)", line):
            if m.group(1) in by_id:
                by_id[m.group(1)]["end"] = now
    return table


def memory(results: Path, rule: str, wildcards: str) -> tuple[float | None, float | None]:
    scheme = wildcards.split("=", 1)[1] if "=" in wildcards else ""
    files = {"evaluate_base": [results / "evaluate/base.json"], "evaluate": [results / "evaluate/finetuned.json"],
             "evaluate_quantized": [results / f"evaluate_quantized/{scheme}.json"],
             "quantize": [results / f"quantize/{scheme}/quantize.json"]}.get(rule, [])
    if rule == "finetune":
        files = sorted(results.glob("finetune/**/*.json"))
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        data = data.get("metrics", data)
        found = {k: v for k, v in _walk(data)}
        planned = found.get("gpu_planned_gib", found.get("predicted_peak_gib"))
        peak = found.get("gpu_peak_gib", found.get("peak_memory_gib"))
        if peak is not None:
            return planned, peak
    return None, None


def _walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def main(results: str = "results") -> None:
    results = Path(results)
    log = Path(os.environ.get("OUT", "/tmp/out")) / "snakemake.log"
    table = jobs(log.read_text())
    print("| job | device | wall s | planner GiB | peak GiB | planner error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for job in table:
        wall = (job["end"] - job["start"]).total_seconds() if job["end"] and job["start"] else None
        planned, peak = memory(results, job["rule"], job["wildcards"]) if job["gpu"] else (None, None)
        error = f"{(planned - peak) / peak:+.1%}" if planned and peak else ""
        name = job["rule"] + (f" ({job['wildcards']})" if job["wildcards"] else "")
        print(f"| {name} | {'GPU' if job['gpu'] else 'CPU'} | {wall if wall is not None else 'not finished'} | "
              f"{planned if planned is not None else ''} | {peak if peak is not None else ''} | {error} |")
    done = [j for j in table if j["end"]]
    if done:
        span = (max(j["end"] for j in done) - min(j["start"] for j in table if j["start"])).total_seconds()
        print(f"\n{len(done)} of {len(table)} jobs finished; first start to last finish {span:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
