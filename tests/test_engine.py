import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, snakemake
from workflow.benchmark import LoadConfig, measure, run_level
from workflow.engine import onnxruntime, tensorrt_llm
from workflow.engine.manifest import MANIFEST, EngineMismatch


@pytest.fixture(scope="module")
def ort_engine(tiny_base, tmp_path_factory):
    engine_dir = tmp_path_factory.mktemp("engine") / "bf16"
    onnxruntime.build(tiny_base, engine_dir, "bf16", "cpu", 32, 4, "sha")
    return engine_dir


def test_engine_generates_what_transformers_generates(tiny_base, ort_engine):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    engine = onnxruntime.OrtEngine(ort_engine)
    for text in ("Ana has 7 pens. Ana buys 3 more.", "Ben has 12 cups."):
        ids = tokenizer(text).input_ids
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        assert list(engine.stream(ids, 12, min_new_tokens=12)) == expected


def test_engine_refuses_a_mismatched_target(ort_engine):
    with pytest.raises(EngineMismatch, match=r"device: built for 'cpu', this target has 'cuda'"):
        onnxruntime.OrtEngine(ort_engine, provider="cuda")
    manifest = json.loads((ort_engine / MANIFEST).read_text())
    moved = ort_engine.parent / "moved"
    moved.mkdir()
    for f in ort_engine.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    manifest["target"]["backend_version"] = "0.9.0"
    (moved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatch) as err:
        onnxruntime.OrtEngine(moved)
    assert "backend_version: built for '0.9.0', this target has '0.18.0'" in str(err.value)
    (moved / MANIFEST).unlink()
    with pytest.raises(EngineMismatch, match="has no engine_manifest.json"):
        onnxruntime.OrtEngine(moved)


def test_an_engine_states_the_quantization_it_really_holds(tiny_base, tmp_path, ort_engine):
    assert json.loads((ort_engine / MANIFEST).read_text())["algorithm"] == "none: unquantized weights"
    manifest = onnxruntime.build(tiny_base, tmp_path / "int4", "int4_awq", "cpu", 32, 4, "sha")
    assert manifest.algorithm == ("int4 weight-only, round-to-nearest (not AWQ: the quantize stage's activation-aware "
                                  "scales are not applied), block 32")
    assert json.loads((tmp_path / "int4" / MANIFEST).read_text())["algorithm"] == manifest.algorithm


def test_fp8_has_no_onnxruntime_engine():
    with pytest.raises(ValueError, match="scheme fp8 has no ONNX Runtime GenAI engine on cpu .* use engine.backend: tensorrt_llm"):
        onnxruntime.precision_for("fp8", "cpu")
    assert onnxruntime.precision_for("int4_awq", "cpu") == "int4"


def write_config(path, heads=32, kv_heads=8, layers=32, quant_algo="FP8"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": layers}))
    (path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": quant_algo}}))
    return path


def test_tensorrt_llm_plan_for_tp4_pp2(tmp_path):
    settings = tensorrt_llm.TrtllmSettings(tp_size=4, pp_size=2, max_batch_size=128, max_input_len=512, max_seq_len=640)
    plan = tensorrt_llm.plan(write_config(tmp_path / "ckpt"), tmp_path / "engine", "fp8", settings)
    assert plan.world_size == 8 and plan.quant_algo == "FP8"
    assert plan.llm_arguments() == {
        "model": str(tmp_path / "ckpt"), "tensor_parallel_size": 4, "pipeline_parallel_size": 2,
        "build_config": {"max_batch_size": 128, "max_input_len": 512, "max_seq_len": 640},
    }
    serve = plan.serve_command()
    assert serve[:2] == ["trtllm-serve", str(tmp_path / "ckpt")]
    assert serve[serve.index("--tp_size") + 1] == "4" and serve[serve.index("--pp_size") + 1] == "2"


def test_tensorrt_llm_plan_refuses_splits_the_model_cannot_take(tmp_path):
    with pytest.raises(ValueError) as err:
        tensorrt_llm.plan(write_config(tmp_path / "ckpt", heads=12, kv_heads=3, layers=2), tmp_path / "e", "fp8",
                          tensorrt_llm.TrtllmSettings(tp_size=8, pp_size=4))
    assert str(err.value) == (
        "build_engine (tensorrt_llm): tp_size 8 must divide num_attention_heads 12; tp_size 8 and num_key_value_heads 3 "
        "must divide one another; pp_size 4 exceeds num_hidden_layers 2 (engine.tensorrt_llm)"
    )


def test_tensorrt_llm_missing_is_a_clear_error(tmp_path):
    plan = tensorrt_llm.plan(write_config(tmp_path / "ckpt"), tmp_path / "e", "fp8", tensorrt_llm.TrtllmSettings())
    with pytest.raises(tensorrt_llm.TrtllmMissing, match=r"needs TensorRT-LLM 1\.2\.1.*--sdm apptainer.*nvcr\.io/nvidia/tensorrt-llm/release:1\.2\.1"):
        tensorrt_llm.build(plan, "sha")


def test_dag_asks_for_tp_times_pp_gpus_and_the_release_container(tmp_path):
    config = {"engine": {"backend": "tensorrt_llm", "tensorrt_llm": {"tp_size": 4, "pp_size": 2}}}
    done = snakemake(tmp_path, config, "-n", "results/engine/tensorrt_llm/fp8")
    job = done.stdout.split("rule build_engine_tensorrt_llm:")[1].split("\n\n")[0]
    assert "gpu=8" in job
    for stage in ("engine", "benchmark"):  # build_engine_tensorrt_llm, benchmark_tensorrt_llm
        rules = (REPO / "rules" / f"{stage}.smk").read_text()
        assert rules.count(f'"{tensorrt_llm.CONTAINER}"') == 1, f"rules/{stage}.smk: TensorRT-LLM runs in the pinned release container"


class GatedEngine:
    """A stand-in whose slow request (prompt [1]) cannot finish before the three fast ones (prompt [2]) have:
    admitted as others finish, the fast ones run one after another beside it; lock-step batches of 2 would wait
    for the slow request before starting the third fast one, and it would give up waiting."""

    def __init__(self):
        self.fast_finished, self.lock, self.all_fast = 0, threading.Lock(), threading.Event()
        self.slow_saw_all_fast = None

    def stream(self, prompt_ids, max_new_tokens, min_new_tokens=0):
        for step in range(max_new_tokens):
            if prompt_ids[0] == 1 and step == max_new_tokens - 1:
                self.slow_saw_all_fast = self.all_fast.wait(timeout=30)
            yield 0
        if prompt_ids[0] == 2:
            with self.lock:
                self.fast_finished += 1
                if self.fast_finished == 3:
                    self.all_fast.set()


def test_requests_are_admitted_as_others_finish():
    # Order, not time: benchmarks/admission.py measures the wall time against lock-step batches in one run.
    engine = GatedEngine()
    results, _ = run_level(engine, [[1], [2], [2], [2]], 8, concurrency=2)
    assert sorted(r.output_tokens for r in results) == [8, 8, 8, 8]
    assert engine.slow_saw_all_fast, "the fast requests did not all finish beside the slow one"


def test_benchmark_on_a_real_engine_reports_every_level(tiny_base, ort_engine):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    levels, latencies = measure(onnxruntime.OrtEngine(ort_engine), len(tokenizer), set(tokenizer.all_special_ids),
                                LoadConfig(input_len=16, output_len=6, concurrency=(1, 3), requests=5))
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    for level in levels:
        assert level["output_tokens_per_request"] == 6 and level["requests"] == 5
        assert 0 < level["ttft_p50_s"] <= level["latency_p50_s"] <= level["latency_p95_s"] <= level["latency_p99_s"]
    assert all(len(v) == 5 for v in latencies.values())
