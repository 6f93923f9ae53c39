import pytest

from workflow.config import ConfigError, settings
from workflow.evaluate import GateFailed, accuracy_gate
from workflow.select import choose, compare, table


def quantized(scheme, accuracy, max_loss=0.05, baseline=0.8):
    return accuracy_gate(scheme, accuracy, baseline, max_loss) | {"checkpoint_bytes": 2**20}


def engine(scheme, accuracy, baseline=0.8, mb=1.0):
    return accuracy_gate(scheme, accuracy, baseline, 0.05) | {"engine_bytes": mb * 2**20, "manifest": {"precision": "int4", "algorithm": "int4 RTN"}}


def bench(tokens_per_s, p95, spread=0.0):
    return {"levels": [{"concurrency": 1, "output_tokens_per_s": 1.0, "latency_p95_s": 0.1},
                       {"concurrency": 4, "output_tokens_per_s": tokens_per_s, "latency_p95_s": p95, "output_tokens_per_s_spread": spread}]}


SCHEMES = ["bf16", "fp8", "int8_sq", "int4_awq"]


def evidence(slo=1.0):
    q = {"bf16": quantized("bf16", 0.80), "fp8": quantized("fp8", 0.79), "int8_sq": quantized("int8_sq", 0.70), "int4_awq": quantized("int4_awq", 0.78)}
    e = {"bf16": engine("bf16", 0.80), "int4_awq": engine("int4_awq", 0.79)}
    b = {"bf16": bench(100.0, 0.5), "int4_awq": bench(300.0, 0.4)}
    return compare(SCHEMES, q, e, b, slo, "onnxruntime")


def test_every_scheme_gets_a_verdict_with_its_numbers():
    rows = {r["scheme"]: r for r in evidence()}
    assert rows["bf16"]["verdict"] == "eligible" and rows["int4_awq"]["verdict"] == "eligible"
    assert rows["fp8"]["verdict"] == "no onnxruntime engine for fp8"
    assert rows["int8_sq"]["verdict"] == "dropped: int8_sq: accuracy loss +0.100 (0.800 -> 0.700) > quantize.max_accuracy_loss.int8_sq 0.050"
    assert "| int4_awq | 0.780 | +0.020 | int4 RTN | 0.790 | +0.010 |" in table(list(rows.values()))


def test_policies_choose_among_eligible_schemes():
    assert choose(evidence(), "max_throughput")[0]["scheme"] == "int4_awq"
    assert choose(evidence(), "max_accuracy")[0]["scheme"] == "bf16"
    with pytest.raises(ConfigError, match="config: select.policy: 'cheapest' is not allowed; allowed values: 'max_throughput', 'max_accuracy'"):
        settings({"select": {"policy": "cheapest"}})


def test_latency_slo_drops_slow_schemes_and_nothing_eligible_stops_the_dag():
    rows = evidence(slo=0.45)
    assert {r["scheme"]: r["verdict"] for r in rows}["bf16"] == "dropped: p95 latency 0.500 s > select.latency_slo_p95_s 0.450"
    assert choose(rows, "max_throughput")[0]["scheme"] == "int4_awq"
    with pytest.raises(GateFailed) as err:
        choose(evidence(slo=0.1), "max_throughput")
    assert "select: no scheme is eligible" in str(err.value) and "int4_awq: dropped: p95 latency 0.400 s" in str(err.value)


def test_throughputs_within_the_measured_spread_tie_and_the_smaller_engine_wins():
    q = {s: quantized(s, 0.80) for s in SCHEMES}
    e = {"bf16": engine("bf16", 0.80, mb=4.0), "int8_sq": engine("int8_sq", 0.80, mb=2.0), "int4_awq": engine("int4_awq", 0.79, mb=1.0)}
    noisy = {"bf16": bench(104.0, 0.5, spread=6.0), "int8_sq": bench(101.0, 0.5, spread=3.0), "int4_awq": bench(99.0, 0.4, spread=2.0)}
    chosen, reason = choose(compare(SCHEMES, q, e, noisy, 1.0, "onnxruntime"), "max_throughput")
    assert chosen["scheme"] == "int4_awq"
    assert reason == ("throughput tie within the benchmark's measured spread: int4_awq 99.0 output tokens/s (spread 2.0), "
                      "bf16 104.0 (spread 6.0), int8_sq 101.0 (spread 3.0); the smallest engine (1.00 MB) wins the tie")
    steady = {"bf16": bench(104.0, 0.5, spread=1.0), "int8_sq": bench(101.0, 0.5, spread=1.0), "int4_awq": bench(99.0, 0.4, spread=1.0)}
    chosen, reason = choose(compare(SCHEMES, q, e, steady, 1.0, "onnxruntime"), "max_throughput")
    assert chosen["scheme"] == "bf16" and reason.startswith("highest throughput (104.0 output tokens/s, more than the measured spread")
    rows = compare(SCHEMES, q, e, noisy, 1.0, "onnxruntime")
    assert "| 99.0 (spread 2.0) | 0.400 | eligible |" in table(rows)
