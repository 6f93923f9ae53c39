"""The scheme plots, drawn from a small real benchmark of two built engines and a real selection: the PNG select
writes, logs to MLflow and the summary shows, and figures that carry the measured numbers and the gates."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from workflow import plots, schemes, summary
from workflow.benchmark import benchmark
from workflow.config import EngineConfig, LoadConfig, SelectConfig
from workflow.engine import onnxruntime
from workflow.evaluate import accuracy_gate
from workflow.select import select
from workflow.tracking import pipeline_run_id

pytestmark = pytest.mark.slow  # builds and benchmarks two engines (about 2 minutes on 2 cores)

# Two schemes ONNX Runtime builds on CPU: the baseline and the smallest engine (from the project's scheme table).
ENGINES = [s for s in schemes.SCHEMES if schemes.buildable(s, "onnxruntime", "cpu")]
PAIR = [schemes.BASELINE, min(ENGINES, key=lambda s: schemes.SCHEMES[s].weight_bytes)]
BASELINE, MAX_LOSS = 0.75, 0.05


def gate_record(scheme: str, accuracy: float, **extra) -> dict:
    return accuracy_gate(scheme, accuracy, BASELINE, MAX_LOSS) | extra


@pytest.fixture(scope="module")
def measured(tiny_base, tmp_path_factory):
    """Engines of both schemes, each benchmarked for real at concurrency 1 and 2 (benchmark.json records)."""
    from workflow.tracking import Tracking

    root = tmp_path_factory.mktemp("plots")
    tracking = Tracking(uri=f"sqlite:///{root}/mlflow.db", experiment="tests", results_dir=str(root / "results"))
    load = LoadConfig(input_len=12, output_len=4, concurrency=(1, 2), requests=3)
    engines, benchmarks = {}, {}
    for scheme in PAIR:
        engines[scheme] = root / "engine" / scheme
        onnxruntime.build(tiny_base, engines[scheme], scheme, "cpu", 32, 4, "sha")
        benchmarks[scheme] = root / "benchmark" / f"{scheme}.json"
        benchmarks[scheme].parent.mkdir(exist_ok=True)
        benchmark(engines[scheme], tiny_base, benchmarks[scheme], scheme, EngineConfig(), load, tracking)
    return tracking, root, engines, benchmarks


def test_select_writes_the_scheme_plot_logs_it_and_the_summary_shows_it(measured):
    tracking, root, engines, benchmarks = measured
    quantized_paths = {}
    for scheme, accuracy in zip(PAIR, (0.75, 0.72)):
        quantized_paths[scheme] = root / "quantize" / f"{scheme}.json"
        quantized_paths[scheme].parent.mkdir(exist_ok=True)
        quantized_paths[scheme].write_text(json.dumps(gate_record(scheme, accuracy, checkpoint_bytes=2**20)))
        manifest = json.loads((engines[scheme] / "engine_manifest.json").read_text())
        (engines[scheme] / "accuracy.json").write_text(json.dumps(gate_record(scheme, accuracy - 0.01, engine_bytes=2**20,
                                                                                manifest=manifest)))
    results = Path(tracking.results_dir) / "select"
    results.mkdir(parents=True)
    decision = select(PAIR, quantized_paths, engines, benchmarks, SelectConfig(latency_slo_p95_s=60), "onnxruntime",
                      results / "selection.json", results / "report.md", tracking)
    png = results / "schemes.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 2 * image.size[1]  # three panels side by side
    assert "![throughput, p95 latency and accuracy per scheme](schemes.png)" in (results / "report.md").read_text()
    client = MlflowClient()
    select_run = client.get_run(decision_run(client, tracking))
    assert "schemes.png" in {a.path for a in client.list_artifacts(select_run.info.run_id)}
    html = summary.render(summary.collect(tracking, tracking.results_dir))[0]
    assert 'id="schemes-plot"' in html and "data:image/png;base64," in html


def decision_run(client: MlflowClient, tracking) -> str:
    parent = client.get_run(pipeline_run_id(tracking))
    runs = client.search_runs([parent.info.experiment_id], "attributes.run_name = 'select'")
    return runs[0].info.run_id


def test_the_figure_carries_the_measured_numbers_and_the_gates(measured):
    _, _, _, benchmarks = measured
    records = {s: json.loads(benchmarks[s].read_text()) for s in PAIR}
    quantized = {PAIR[0]: gate_record(PAIR[0], 0.75), PAIR[1]: gate_record(PAIR[1], 0.6)}
    engines = {PAIR[0]: gate_record(PAIR[0], 0.74), PAIR[1]: None}  # no engine: its bar is missing, not zero
    fig = plots.scheme_figure(quantized, engines, records, slo_p95_s=1.5, selected=PAIR[0])
    throughput, latency, accuracy = fig.axes
    for scheme in PAIR:
        levels = records[scheme]["levels"]
        lines = {line.get_label(): line for line in throughput.get_lines()}
        key = f"{scheme} (selected)" if scheme == PAIR[0] else scheme
        assert list(lines[key].get_ydata()) == [lv["output_tokens_per_s"] for lv in levels]
        assert list(lines[key].get_xdata()) == [1, 2]
        assert list({ln.get_label(): ln for ln in latency.get_lines()}[key].get_ydata()) == [lv["latency_p95_s"] for lv in levels]
    assert any(list(line.get_ydata()) == [1.5, 1.5] for line in latency.get_lines()), "the SLO line"
    heights = [bar.get_height() for bar in accuracy.patches]
    assert heights[:2] == [0.75, 0.6] and heights[2] == 0.74 and heights[3] != heights[3]  # NaN for the missing engine
    gates = [segment[0][1] for collection in accuracy.collections for segment in collection.get_segments()]
    assert gates == pytest.approx([BASELINE - MAX_LOSS] * 2)
    plots.save(fig, Path(benchmarks[PAIR[0]]).with_name("figure.png"))
