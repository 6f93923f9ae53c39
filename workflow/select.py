"""select: choose the production scheme by a policy, and write the decision with its evidence.

    snakemake results/select/selection.json

A scheme is eligible when its quantized model passed the accuracy and closeness gates, its engine passed the same
gates (accuracy on its own generations, closeness to the fine-tuned model), and its p95 request latency at the highest benchmarked concurrency is within the
SLO. Policies: max_throughput (output tokens/s at the highest concurrency) or max_accuracy (engine accuracy).

Throughputs are noisy (on the embedded default the engines are within run-to-run noise of one another), so under
max_throughput every eligible scheme whose throughput is within the benchmark's measured spread of the fastest
(max - min over its repeated runs, the larger of the two schemes') ties with it, and the tie goes to the smallest
engine, or with select.tie_break: closest to the engine closest to the fine-tuned model (lowest mean KL,
workflow/closeness.py); the report says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow

from workflow import plots
from workflow.config import SelectConfig
from workflow.tracking import GateFailed, Tracking, describe, job_run, record_gate

log = logging.getLogger(__name__)

def read_json(path: str | Path | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path and Path(path).exists() else None


def compare(schemes: list[str], quantized: dict, engines: dict, benchmarks: dict, slo_p95_s: float, backend: str) -> list[dict]:
    """One row per scheme with every number the decision uses, and why it is (not) eligible."""
    rows = []
    for scheme in schemes:
        q, e, b = quantized[scheme], engines.get(scheme), benchmarks.get(scheme)
        top = b["levels"][-1] if b else None
        row = {
            "scheme": scheme,
            "quantized_accuracy": q["accuracy"],
            "quantized_loss": q["accuracy_loss"],
            "checkpoint_mb": q["checkpoint_bytes"] / 2**20,
            "engine_accuracy": e["accuracy"] if e else None,
            "engine_loss": e["accuracy_loss"] if e else None,
            "quantized_mean_kl": q.get("mean_kl"),
            "quantized_agreement": q.get("next_token_agreement"),
            "quantized_perplexity_ratio": q.get("perplexity_ratio"),
            "engine_mean_kl": e.get("mean_kl") if e else None,
            "engine_agreement": e.get("next_token_agreement") if e else None,
            "engine_perplexity_ratio": e.get("perplexity_ratio") if e else None,
            "engine_mb": e["engine_bytes"] / 2**20 if e else None,
            "engine_precision": e["manifest"]["precision"] if e else None,
            "engine_algorithm": e["manifest"].get("algorithm") if e else None,
            "output_tokens_per_s": top["output_tokens_per_s"] if top else None,
            "output_tokens_per_s_spread": top.get("output_tokens_per_s_spread", 0.0) if top else None,
            "latency_p95_s": top["latency_p95_s"] if top else None,
            "concurrency": top["concurrency"] if top else None,
        }
        if not q["passed"]:
            row["verdict"] = f"dropped: {q['reason']}"
        elif e is None:
            row["verdict"] = f"no {backend} engine for {scheme}"
        elif not e["passed"]:
            row["verdict"] = f"dropped: engine {e['reason']}"
        elif top["latency_p95_s"] > slo_p95_s:
            row["verdict"] = f"dropped: p95 latency {top['latency_p95_s']:.3f} s > select.latency_slo_p95_s {slo_p95_s:.3f}"
        else:
            row["verdict"] = "eligible"
        rows.append(row)
    return rows


def choose(rows: list[dict], policy: str, tie_break: str = "smallest") -> tuple[dict, str]:
    """The selected row and why, in words (policy and tie_break: select.policy and select.tie_break, which the config
    checked; the closest engine needs every tied row's closeness figures, else the smallest wins)."""
    eligible = [r for r in rows if r["verdict"] == "eligible"]
    if not eligible:
        raise GateFailed("select: no scheme is eligible:\n" + "\n".join(f"  {r['scheme']}: {r['verdict']}" for r in rows))
    if policy == "max_accuracy":
        chosen = max(eligible, key=lambda r: (r["engine_accuracy"], r["output_tokens_per_s"]))
        return chosen, f"highest engine accuracy ({chosen['engine_accuracy']:.3f})"
    fastest = max(eligible, key=lambda r: r["output_tokens_per_s"])
    tied = [r for r in eligible if fastest["output_tokens_per_s"] - r["output_tokens_per_s"]
            <= max(fastest["output_tokens_per_s_spread"], r["output_tokens_per_s_spread"])]
    closest = tie_break == "closest" and all(r["engine_mean_kl"] is not None for r in tied)
    chosen = min(tied, key=lambda r: ((r["engine_mean_kl"] if closest else 0.0), r["engine_mb"], -r["output_tokens_per_s"]))
    if len(tied) == 1:
        return chosen, (f"highest throughput ({chosen['output_tokens_per_s']:.1f} output tokens/s, more than the measured "
                        f"spread ahead of every other eligible scheme)")
    others = ", ".join(f"{r['scheme']} {r['output_tokens_per_s']:.1f} (spread {r['output_tokens_per_s_spread']:.1f})"
                       for r in tied if r is not chosen)
    return chosen, (f"throughput tie within the benchmark's measured spread: {chosen['scheme']} "
                    f"{chosen['output_tokens_per_s']:.1f} output tokens/s (spread {chosen['output_tokens_per_s_spread']:.1f}), "
                    f"{others}; " + (f"the engine closest to the fine-tuned model (mean KL {chosen['engine_mean_kl']:.4f}) wins the tie"
                                     if closest else f"the smallest engine ({chosen['engine_mb']:.2f} MB) wins the tie"))


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def pair(row: dict, key: str, spec: str) -> str:
    """The quantized model's and the engine's figure, "quantized / engine"."""
    return f"{fmt(row[f'quantized_{key}'], spec)} / {fmt(row[f'engine_{key}'], spec)}"


def spread(row: dict) -> str:
    return f" (spread {row['output_tokens_per_s_spread']:.1f})" if row.get("output_tokens_per_s_spread") else ""


def table(rows: list[dict]) -> str:
    lines = [
        "| scheme | accuracy (quantized) | loss vs fine-tuned | engine quantization | engine accuracy | engine loss "
        "| mean KL (quantized / engine) | next-token agreement (quantized / engine) | checkpoint MB "
        "| engine MB | output tok/s (spread) | p95 latency s | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['scheme']} | {r['quantized_accuracy']:.3f} | {r['quantized_loss']:+.3f} | {r.get('engine_algorithm') or '–'} | "
            f"{fmt(r['engine_accuracy'], '.3f')} | "
            f"{fmt(r['engine_loss'], '+.3f')} | {pair(r, 'mean_kl', '.4f')} | {pair(r, 'agreement', '.4f')} | {r['checkpoint_mb']:.2f} | {fmt(r['engine_mb'], '.2f')} | "
            f"{fmt(r['output_tokens_per_s'], '.1f')}{spread(r)} | {fmt(r['latency_p95_s'], '.3f')} | {r['verdict']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], chosen: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["output_tokens_per_s"] is None:
            continue
        ax.scatter(r["output_tokens_per_s"], r["engine_accuracy"], s=80, marker="*" if r["scheme"] == chosen else "o")
        ax.annotate(r["scheme"], (r["output_tokens_per_s"], r["engine_accuracy"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("output tokens/s (highest concurrency)")
    ax.set_ylabel("engine accuracy (held-out test)")
    ax.set_title(f"accuracy vs throughput; selected: {chosen}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gate_checks(rows: list[dict], slo_p95_s: float) -> list[dict]:
    """select's gate for record_gate: each benchmarked scheme's p95 latency vs the SLO, and at least one eligible scheme."""
    checks = [{"name": f"{r['scheme']}: p95 latency <= select.latency_slo_p95_s", "passed": r["latency_p95_s"] <= slo_p95_s,
               "value": r["latency_p95_s"], "threshold": slo_p95_s, "detail": f"at concurrency {r['concurrency']}"}
              for r in rows if r["latency_p95_s"] is not None]
    eligible = [r["scheme"] for r in rows if r["verdict"] == "eligible"]
    return checks + [{"name": "eligible schemes >= 1", "passed": bool(eligible), "value": len(eligible), "threshold": 1,
                      "detail": ", ".join(eligible) or "; ".join(f"{r['scheme']}: {r['verdict']}" for r in rows)}]


def select(schemes: list[str], quantized_paths: dict, engine_dirs: dict, benchmark_paths: dict, cfg: SelectConfig,
           backend: str, out_path: str | Path, report_path: str | Path, tracking: Tracking) -> dict:
    out_path, report_path = Path(out_path), Path(report_path)
    policy, slo_p95_s = cfg.policy, cfg.latency_slo_p95_s
    with job_run(tracking, "select", {"policy": policy, "latency_slo_p95_s": slo_p95_s, "tie_break": cfg.tie_break, "schemes": schemes}):
        quantized = {s: read_json(quantized_paths[s]) for s in schemes}
        engines = {s: read_json(Path(d) / "accuracy.json") for s, d in engine_dirs.items()}
        benchmarks = {s: read_json(p) for s, p in benchmark_paths.items()}
        rows = compare(schemes, quantized, engines, benchmarks, slo_p95_s, backend)
        mlflow.log_table({key: [r[key] for r in rows] for key in rows[0]}, "comparison.json")
        record_gate(gate_checks(rows, slo_p95_s))
        schemes_png = report_path.with_name("schemes.png")
        try:
            chosen, reason = choose(rows, policy, cfg.tie_break)
        except GateFailed:
            plots.save(plots.scheme_figure(quantized, engines, benchmarks, slo_p95_s, None), schemes_png)
            report_path.write_text("# Scheme selection: nothing eligible\n\n" + table(rows) + "\n\n![schemes](schemes.png)\n")
            mlflow.log_artifact(str(report_path))
            mlflow.log_artifact(str(schemes_png))
            describe("Nothing eligible:\n\n" + table(rows))
            raise
        figure = report_path.with_name("accuracy_vs_throughput.png")
        plot(rows, chosen["scheme"], figure)
        plots.save(plots.scheme_figure(quantized, engines, benchmarks, slo_p95_s, chosen["scheme"]), schemes_png)
        decision = {"selected": chosen["scheme"], "engine_dir": str(engine_dirs[chosen["scheme"]]), "policy": policy,
                    "reason": reason, "latency_slo_p95_s": slo_p95_s, "backend": backend, "evidence": rows}
        report_path.write_text("\n".join([
            f"# Scheme selection: **{chosen['scheme']}**",
            "",
            f"Policy `{policy}` among schemes that passed the accuracy and closeness gates and the p95 latency SLO ({slo_p95_s} s); "
            f"backend `{backend}`. Selected {chosen['scheme']}: {chosen['output_tokens_per_s']:.1f} output tokens/s at concurrency "
            f"{chosen['concurrency']}, engine accuracy {chosen['engine_accuracy']:.3f} ({chosen['engine_loss']:+.3f} vs fine-tuned).",
            "",
            f"Why: {reason}.",
            "",
            table(rows),
            "",
            "![throughput, p95 latency and accuracy per scheme](schemes.png)",
            "",
            "![accuracy vs throughput](accuracy_vs_throughput.png)",
        ]) + "\n")
        out_path.write_text(json.dumps(decision, indent=1))
        for artifact in (report_path, figure, schemes_png, out_path):
            mlflow.log_artifact(str(artifact))
        mlflow.set_tags({"ft2prod.selected_scheme": chosen["scheme"]})
        describe(f"Selected **{chosen['scheme']}** by `{policy}`: {chosen['output_tokens_per_s']:.1f} output tokens/s at concurrency "
                 f"{chosen['concurrency']}, engine accuracy {chosen['engine_accuracy']:.3f}, p95 {chosen['latency_p95_s']:.3f} s "
                 f"(SLO {slo_p95_s} s). Why: {reason}.\n\n" + table(rows))
        log.info("selected %s (%s)", chosen["scheme"], policy)
        return decision
