import pytest

from workflow import schemes
from workflow.config import ConfigError, settings
from workflow.evaluate import accuracy_gate
from workflow.select import choose, compare, table
from workflow.tracking import GateFailed


def quantized(scheme, accuracy, max_loss=0.05, baseline=0.8):
    return accuracy_gate(scheme, accuracy, baseline, max_loss) | {"checkpoint_bytes": 2**20}


def engine(scheme, accuracy, baseline=0.8, mb=1.0):
    return accuracy_gate(scheme, accuracy, baseline, 0.05) | {"engine_bytes": mb * 2**20, "manifest": {"precision": "int4", "algorithm": "int4 RTN"}}


def bench(tokens_per_s, p95, spread=0.0):
    return {"levels": [{"concurrency": 1, "output_tokens_per_s": 1.0, "latency_p95_s": 0.1},
                       {"concurrency": 4, "output_tokens_per_s": tokens_per_s, "latency_p95_s": p95, "output_tokens_per_s_spread": spread}]}


# The scheme table's rows in the parts these tests give them: the baseline, the smallest engine, the other schemes
# ONNX Runtime on CPU builds, and those it cannot build.
SCHEMES = list(schemes.SCHEMES)
BASE = schemes.BASELINE
ENGINES = [s for s in SCHEMES if schemes.buildable(s, "onnxruntime", "cpu")]
SMALL = min(ENGINES, key=lambda s: schemes.SCHEMES[s].weight_bytes)
MIDDLE = [s for s in ENGINES if s not in (BASE, SMALL)]
NO_ENGINE = [s for s in SCHEMES if s not in ENGINES]


def evidence(slo=1.0):
    q = {s: quantized(s, 0.80 if s == BASE else 0.70 if s in MIDDLE else 0.79 if s in NO_ENGINE else 0.78) for s in SCHEMES}
    e = {BASE: engine(BASE, 0.80), SMALL: engine(SMALL, 0.79)}
    b = {BASE: bench(100.0, 0.5), SMALL: bench(300.0, 0.4)}
    return compare(SCHEMES, q, e, b, slo, "onnxruntime")


def test_every_scheme_gets_a_verdict_with_its_numbers():
    rows = {r["scheme"]: r for r in evidence()}
    assert rows[BASE]["verdict"] == "eligible" and rows[SMALL]["verdict"] == "eligible"
    assert all(rows[s]["verdict"] == f"no onnxruntime engine for {s}" for s in NO_ENGINE)
    assert all(rows[s]["verdict"] == f"dropped: {s}: accuracy loss +0.100 (0.800 -> 0.700) > quantize.max_accuracy_loss.{s} 0.050"
               for s in MIDDLE)
    assert f"| {SMALL} | 0.780 | +0.020 | int4 RTN | 0.790 | +0.010 | – / – | – / – |" in table(list(rows.values()))


def test_policies_choose_among_eligible_schemes():
    assert choose(evidence(), "max_throughput")[0]["scheme"] == SMALL
    assert choose(evidence(), "max_accuracy")[0]["scheme"] == BASE
    with pytest.raises(ConfigError, match="config: select.policy: 'cheapest' is not allowed; allowed values: 'max_throughput', 'max_accuracy'"):
        settings({"select": {"policy": "cheapest"}})


def test_latency_slo_drops_slow_schemes_and_nothing_eligible_stops_the_dag():
    rows = evidence(slo=0.45)
    assert {r["scheme"]: r["verdict"] for r in rows}[BASE] == "dropped: p95 latency 0.500 s > select.latency_slo_p95_s 0.450"
    assert choose(rows, "max_throughput")[0]["scheme"] == SMALL
    with pytest.raises(GateFailed) as err:
        choose(evidence(slo=0.1), "max_throughput")
    assert "select: no scheme is eligible" in str(err.value) and f"{SMALL}: dropped: p95 latency 0.400 s" in str(err.value)


def test_throughputs_within_the_measured_spread_tie_and_the_smaller_engine_wins():
    middle = MIDDLE[0]
    q = {s: quantized(s, 0.80) for s in SCHEMES}
    e = {BASE: engine(BASE, 0.80, mb=4.0), middle: engine(middle, 0.80, mb=2.0), SMALL: engine(SMALL, 0.79, mb=1.0)}
    noisy = {BASE: bench(104.0, 0.5, spread=6.0), middle: bench(101.0, 0.5, spread=3.0), SMALL: bench(99.0, 0.4, spread=2.0)}
    chosen, reason = choose(compare(SCHEMES, q, e, noisy, 1.0, "onnxruntime"), "max_throughput")
    assert chosen["scheme"] == SMALL
    ahead = sorted([(BASE, "104.0 (spread 6.0)"), (middle, "101.0 (spread 3.0)")], key=lambda r: SCHEMES.index(r[0]))
    assert reason == (f"throughput tie within the benchmark's measured spread: {SMALL} 99.0 output tokens/s (spread 2.0), "
                      + ", ".join(f"{s} {t}" for s, t in ahead) + "; the smallest engine (1.00 MB) wins the tie")
    steady = {BASE: bench(104.0, 0.5, spread=1.0), middle: bench(101.0, 0.5, spread=1.0), SMALL: bench(99.0, 0.4, spread=1.0)}
    chosen, reason = choose(compare(SCHEMES, q, e, steady, 1.0, "onnxruntime"), "max_throughput")
    assert chosen["scheme"] == BASE and reason.startswith("highest throughput (104.0 output tokens/s, more than the measured spread")
    rows = compare(SCHEMES, q, e, noisy, 1.0, "onnxruntime")
    assert "| 99.0 (spread 2.0) | 0.400 | eligible |" in table(rows)


def test_a_throughput_tie_goes_to_the_engine_closest_to_the_fine_tuned_model():
    middle = MIDDLE[0]
    q = {s: quantized(s, 0.80) | {"mean_kl": 0.01, "next_token_agreement": 0.99} for s in SCHEMES}
    close = {BASE: 0.0004, middle: 0.003, SMALL: 0.02}
    e = {s: engine(s, 0.80, mb=mb) | {"mean_kl": close[s], "next_token_agreement": 0.95} for s, mb in ((BASE, 4.0), (middle, 2.0), (SMALL, 1.0))}
    noisy = {BASE: bench(99.0, 0.5, spread=6.0), middle: bench(101.0, 0.5, spread=3.0), SMALL: bench(104.0, 0.4, spread=2.0)}
    rows = compare(SCHEMES, q, e, noisy, 1.0, "onnxruntime")
    assert choose(rows, "max_throughput")[0]["scheme"] == SMALL  # select.tie_break's default: the smallest engine
    chosen, reason = choose(rows, "max_throughput", "closest")
    assert chosen["scheme"] == BASE
    assert reason.endswith("; the engine closest to the fine-tuned model (mean KL 0.0004) wins the tie")
    assert f"| {SMALL} | 0.800 | +0.000 | int4 RTN | 0.800 | +0.000 | 0.0100 / 0.0200 | 0.9900 / 0.9500 |" in table(rows)
    apart = {BASE: bench(99.0, 0.5, spread=1.0), middle: bench(101.0, 0.5, spread=1.0), SMALL: bench(104.0, 0.4, spread=1.0)}
    assert choose(compare(SCHEMES, q, e, apart, 1.0, "onnxruntime"), "max_throughput", "closest")[0]["scheme"] == SMALL
    with pytest.raises(ConfigError, match="config: select.tie_break: 'fastest' is not allowed; allowed values: 'smallest', 'closest'"):
        settings({"select": {"tie_break": "fastest"}})
