"""What `import workflow.serve.app` loads and how long it takes, in fresh interpreters, for one or more checkouts.

    .venv/bin/python benchmarks/gateway_import.py [--repeats 5] [--repo PATH ...]

Each repeat is a new interpreter (nothing cached in sys.modules); the checkouts are run in turn, repeat by repeat,
so a change in the machine's load touches them alike. Prints, per checkout: the median and range of the import
time, the project's modules (workflow.*) and all modules loaded, and which of the build's modules and libraries
were among them. Compare checkouts of one run, not runs on different machines or loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HEAVY = ("workflow.engine.build", "workflow.engine.calibration", "workflow.evaluate", "workflow.quantize",
         "workflow.tracking", "workflow.data", "mlflow", "torch", "transformers")
PROBE = ("import json, sys, time; began = time.perf_counter(); import workflow.serve.app; "
         "took = time.perf_counter() - began; print(json.dumps({'seconds': took, 'modules': sorted(sys.modules)}))")


def probe(repo: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per checkout; the median is reported")
    parser.add_argument("--repo", type=Path, action="append", help="a checkout (default: this one); give it again to compare")
    args = parser.parse_args()
    repos = args.repo or [Path(__file__).resolve().parent.parent]
    runs = {repo: [] for repo in repos}
    for _ in range(args.repeats):
        for repo in repos:
            runs[repo].append(probe(repo))
    print(f"{platform.node()}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")
    for repo, found in runs.items():
        seconds = [run["seconds"] for run in found]
        modules = found[-1]["modules"]
        project = [m for m in modules if m == "workflow" or m.startswith("workflow.")]
        heavy = [h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in modules)]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo).stdout.strip()
        print(f"{repo} ({commit}): import workflow.serve.app {statistics.median(seconds):.2f} s median "
              f"({min(seconds):.2f}-{max(seconds):.2f}, {len(seconds)} runs); {len(project)} project modules, "
              f"{len(modules)} modules in all; build modules and libraries loaded: {', '.join(heavy) or 'none'}")


if __name__ == "__main__":
    main()
