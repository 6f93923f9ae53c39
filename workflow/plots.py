"""The scheme comparison as pictures (select writes them; MLflow and the summary report show them): output
throughput and p95 request latency per scheme and concurrency, against the latency SLO; and accuracy per scheme,
quantized and on its engine, against the accuracy gate (the fine-tuned accuracy less the scheme's allowed loss).

    from workflow.plots import scheme_figure
    scheme_figure(quantized, engines, benchmarks, slo_p95_s=2.0, selected="int4_awq").savefig("schemes.png")
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on build hosts; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def label(scheme: str, selected: str | None) -> str:
    return f"{scheme} (selected)" if scheme == selected else scheme


def speed_panels(throughput, latency, benchmarks: dict[str, dict | None], slo_p95_s: float, selected: str | None) -> None:
    """Output tokens/s and p95 latency against concurrency, a line per benchmarked scheme."""
    for scheme, bench in benchmarks.items():
        if not bench:
            continue
        levels = sorted(bench["levels"], key=lambda level: level["concurrency"])
        x = [level["concurrency"] for level in levels]
        style = {"marker": "o", "linewidth": 2.5 if scheme == selected else 1.2, "label": label(scheme, selected)}
        throughput.plot(x, [level["output_tokens_per_s"] for level in levels], **style)
        latency.plot(x, [level["latency_p95_s"] for level in levels], **style)
    latency.axhline(slo_p95_s, color="red", linestyle="--", label=f"SLO {slo_p95_s:g} s")
    latency.set_yscale("log")  # the SLO and latencies far below it stay readable together
    levels = sorted({level["concurrency"] for bench in benchmarks.values() if bench for level in bench["levels"]})
    for ax, name in ((throughput, "output tokens/s"), (latency, "p95 request latency (s)")):
        ax.set_xlabel("concurrency")
        ax.set_ylabel(name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    throughput.set_title("throughput per scheme")
    latency.set_title("p95 latency per scheme")


def accuracy_panel(ax, quantized: dict[str, dict], engines: dict[str, dict | None], selected: str | None) -> None:
    """Bars of quantized and engine accuracy per scheme; a tick at each scheme's gate (baseline - allowed loss)."""
    schemes = list(quantized)
    width = 0.38
    for offset, (name, records) in ((-width / 2, ("quantized", quantized)), (width / 2, ("engine", engines))):
        values = [(records.get(s) or {}).get("accuracy", float("nan")) for s in schemes]
        ax.bar([i + offset for i in range(len(schemes))], values, width, label=name)
    for i, scheme in enumerate(schemes):
        gate = quantized[scheme]["baseline_accuracy"] - quantized[scheme]["max_accuracy_loss"]
        ax.hlines(gate, i - 0.45, i + 0.45, color="red", linestyle="--", label="gate" if i == 0 else None)
    baseline = next(iter(quantized.values()))["baseline_accuracy"] if quantized else None
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle=":", label=f"fine-tuned {baseline:.3f}")
    ax.set_xticks(range(len(schemes)), [label(s, selected) for s in schemes], rotation=20, fontsize=8)
    ax.set_ylabel("accuracy (held-out test)")
    ax.set_ylim(0, 1.05)
    ax.set_title("accuracy per scheme against the gate")
    ax.legend(fontsize=8)


def scheme_figure(quantized: dict[str, dict], engines: dict[str, dict | None], benchmarks: dict[str, dict | None],
                  slo_p95_s: float, selected: str | None) -> Figure:
    """The three panels side by side; quantized/engines are accuracy_gate records, benchmarks benchmark.json records."""
    fig, (throughput, latency, accuracy) = plt.subplots(1, 3, figsize=(15, 4.2))
    speed_panels(throughput, latency, benchmarks, slo_p95_s, selected)
    accuracy_panel(accuracy, quantized, engines, selected)
    fig.tight_layout()
    return fig


def save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
