import gc
import json
import random
import threading
import time
import weakref

import mlflow
import numpy as np
import onnx
import pytest
import torch
from conftest import REPO
from onnx import numpy_helper
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from workflow.benchmark import LoadConfig, measure, run_level
from workflow.config import EngineConfig, EvalConfig, QuantizeConfig
from workflow.engine import onnxruntime, tensorrt_llm
from workflow.engine.build import build_engine
from workflow.engine.calibration import CalibrationError, fold_calibration
from workflow.engine.manifest import MANIFEST, EngineMismatch
from workflow.engine.interface import Engine, GenerationRequest
from workflow.engine.runtime import load_engine
from workflow.quantize import quantize


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
        assert list(engine.stream(GenerationRequest(ids, 12, min_new_tokens=12))) == expected


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


def test_load_engine_loads_the_backend_its_manifest_names(ort_engine, tmp_path):
    engine = load_engine(ort_engine, EngineConfig(onnxruntime={"max_batch_size": 2}))
    assert isinstance(engine, onnxruntime.OrtEngine) and isinstance(engine, Engine)
    assert engine.max_batch_size == 2 and engine.manifest.scheme == "bf16"
    assert len(list(engine.stream(GenerationRequest([5, 6, 7], 3, min_new_tokens=3)))) == 3
    engine.close()
    manifest = json.loads((ort_engine / MANIFEST).read_text())
    for backend, refusal in (("tensorrt_llm", tensorrt_llm.TrtllmMissing), ("vllm", ValueError)):
        other = tmp_path / backend
        other.mkdir()
        (other / MANIFEST).write_text(json.dumps(manifest | {"target": manifest["target"] | {"backend": backend}}))
        with pytest.raises(refusal, match="needs TensorRT-LLM" if backend == "tensorrt_llm" else "this runtime loads onnxruntime, tensorrt_llm"):
            load_engine(other, EngineConfig())


@pytest.mark.parametrize(("fields", "refusal"), [
    ({"prompt_ids": [], "max_new_tokens": 4}, "the prompt is empty"),
    ({"prompt_ids": [5], "max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"prompt_ids": [5], "max_new_tokens": 4, "min_new_tokens": -1}, "min_new_tokens must be 0 or more"),
])
def test_a_generation_request_refuses_what_no_engine_can_run(fields, refusal):
    with pytest.raises(ValueError, match=refusal):
        GenerationRequest(**fields)


def test_an_engine_states_the_quantization_it_really_holds(tiny_base, tmp_path, ort_engine):
    assert json.loads((ort_engine / MANIFEST).read_text())["algorithm"] == "none: unquantized weights"
    manifest = onnxruntime.build(tiny_base, tmp_path / "int4", "int4_awq", "cpu", 32, 4, "sha")
    assert manifest.algorithm == "int4 weight-only, round-to-nearest, block 32" and manifest.calibration is None
    assert json.loads((tmp_path / "int4" / MANIFEST).read_text())["algorithm"] == manifest.algorithm


def quantized(model_dir, out_dir, scheme, tracking):
    train = out_dir.parent / "train.jsonl"
    train.write_text("".join(json.dumps({"input_ids": list(range(5 + i, 45 + i)), "labels": []}) + "\n" for i in range(4)))
    quantize(model_dir, train, out_dir, scheme, QuantizeConfig(calib_samples=4), tracking)
    return out_dir


def mha_model(path):
    """A Llama whose every attention head has its own key/value head: o_proj's scales fold into v_proj too."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path.parent / "tokenizer_source")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("scheme", ["int4_awq", "int8_sq"])
def test_folding_the_calibration_changes_nothing_in_fp32(tiny_base, tmp_path, tracking, scheme):
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(tmp_path / "tokenizer_source")
    prompts = [list(range(7, 37)), list(range(100, 160, 2))]
    for model_dir, o_proj_folds in ((tiny_base, False), (mha_model(tmp_path / "mha"), True)):
        q = quantized(model_dir, tmp_path / f"q-{model_dir.name}", scheme, tracking)
        report = fold_calibration(model_dir, q, scheme, tmp_path / f"folded-{model_dir.name}", prompts)
        folded = AutoModelForCausalLM.from_pretrained(tmp_path / f"folded-{model_dir.name}").eval()
        plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            for ids in prompts:
                torch.testing.assert_close(folded(input_ids=torch.tensor([ids])).logits, plain(input_ids=torch.tensor([ids])).logits,
                                           atol=1e-4, rtol=0)
        assert report.calib_sha256 == json.loads((q / "quantize.json").read_text())["calib_sha256"]
        assert report.calibration == {"int4_awq": "AWQ", "int8_sq": "SmoothQuant"}[scheme]
        assert "model.layers.1.mlp.down_proj" in report.folded and "model.layers.0.self_attn.q_proj" in report.folded
        if o_proj_folds:
            assert "model.layers.0.self_attn.o_proj" in report.folded and not report.skipped
        else:
            assert report.skipped["model.layers.0.self_attn.o_proj"].startswith("grouped-query attention (4 heads share 2")
        assert not torch.equal(folded.model.layers[0].input_layernorm.weight, plain.model.layers[0].input_layernorm.weight)


def quantized_weights(engine_dir):
    model = onnx.load(str(engine_dir / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_Q4")}


def test_int4_engine_carries_awq_and_reports_it_beside_round_to_nearest(tiny_base, tmp_path, tracking):
    q = quantized(tiny_base, tmp_path / "q", "int4_awq", tracking)
    row = {"messages": [{"role": "user", "content": "Ana has 2 pens and buys 3."}, {"role": "assistant", "content": "5"}], "answer": "5",
           "input_ids": list(range(5, 20)), "labels": [-100] * 10 + list(range(15, 20))}
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps(row) + "\n")
    finetuned = tmp_path / "finetuned.json"
    finetuned.write_text(json.dumps({"metrics": {"accuracy": 1.0}}))
    settings = EngineConfig(onnxruntime={"execution_provider": "cpu", "block_size": 32, "accuracy_level": 4, "calibration": "auto",
                                         "max_batch_size": 4})
    record = build_engine(tiny_base, q, tmp_path / "engines" / "int4_awq", "int4_awq", settings, test, finetuned,
                          QuantizeConfig(max_accuracy_loss={"int4_awq": 1.0}), EvalConfig(max_samples=1, max_new_tokens=8), tracking)
    manifest = record["manifest"]
    assert manifest["algorithm"].startswith("int4 weight-only, AWQ scales folded (12 of 14 layers")
    assert manifest["algorithm"].endswith("block 32") and manifest["build"]["block_size"] == 32
    assert manifest["calibration"]["calib_sha256"] == json.loads((q / "quantize.json").read_text())["calib_sha256"]
    choice = record["calibration_choice"]
    assert choice["kept"] == "calibrated"  # an untrained model answers nothing right either way: a tie keeps calibrated
    assert set(choice["candidates"]) == {"calibrated", "rtn"}
    assert choice["candidates"]["rtn"]["accuracy_loss"] == 1.0 - choice["candidates"]["rtn"]["accuracy"]
    assert choice["candidates"]["rtn"]["algorithm"] == "int4 weight-only, round-to-nearest, block 32"
    run = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'build_engine/int4_awq'", output_format="list")[0]
    assert {"accuracy_loss", "accuracy_loss_calibrated", "accuracy_loss_rtn", "mean_kl", "next_token_agreement",
            "perplexity_ratio"} <= set(run.data.metrics)
    written = json.loads((tmp_path / "engines" / "int4_awq" / "accuracy.json").read_text())
    assert written["closeness_tokens"] == 5 and written["mean_kl"] == run.data.metrics["mean_kl"] > 0  # int4 drifts
    assert written["passed"] is (written["mean_kl"] <= written["max_kl"] and written["next_token_agreement"] >= written["min_agreement"])
    assert run.data.tags["ft2prod.engine_weights"] == "calibrated"
    onnxruntime.build(tiny_base, tmp_path / "rtn", "int4_awq", "cpu", 32, 4, "sha")
    calibrated, rtn = quantized_weights(tmp_path / "engines" / "int4_awq"), quantized_weights(tmp_path / "rtn")
    assert calibrated.keys() == rtn.keys()
    differing = [name for name in rtn if not np.array_equal(calibrated[name], rtn[name])]
    assert any("qkv_proj" in name for name in differing) and any("down_proj" in name for name in differing)
    assert all("o_proj" not in name for name in differing), "o_proj is not folded under grouped-query attention"


def test_calibrated_engine_refuses_a_quantize_output_without_modelopt_state(tiny_base, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "quantize.json").write_text(json.dumps({"calib_sha256": "x"}))
    with pytest.raises(CalibrationError, match=r"has no modelopt_state.pth; rerun quantize/int4_awq"):
        fold_calibration(tiny_base, tmp_path / "q", "int4_awq", tmp_path / "folded", [[5, 6, 7]])
    with pytest.raises(CalibrationError, match="bf16 has no calibration to carry"):
        fold_calibration(tiny_base, tmp_path / "q", "bf16", tmp_path / "folded", [[5, 6, 7]])


def test_fp8_has_no_onnxruntime_engine():
    with pytest.raises(ValueError, match="scheme fp8 has no ONNX Runtime GenAI engine on cpu .* use engine.backend: tensorrt_llm"):
        onnxruntime.precision_for("fp8", "cpu")
    assert onnxruntime.precision_for("int4_awq", "cpu") == "int4"


def test_a_failed_build_says_so_and_where_the_builder_wrote(tmp_path):
    """The builder runs in the job's process: a model folder it cannot read is a RuntimeError naming the log, and
    what the builder printed is in that log, not on the console."""
    model = tmp_path / "not-a-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    log = tmp_path / "build.log"
    with pytest.raises(RuntimeError, match=f"the ONNX Runtime GenAI builder failed .*; see {log}"):
        onnxruntime.build(model, tmp_path / "engine", "bf16", "cpu", 32, 4, "sha", log_path=log)
    assert log.read_text() and not (tmp_path / "engine" / MANIFEST).exists()


def write_config(path, heads=32, kv_heads=8, layers=32, quant_algo="FP8"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": layers}))
    (path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": quant_algo}}))
    return path


def test_tensorrt_llm_plan_for_tp4_pp2(tmp_path):
    settings = tensorrt_llm.TrtllmSettings(tp_size=4, pp_size=2, max_batch_size=128, max_input_len=512, max_seq_len=640)
    plan = tensorrt_llm.plan(write_config(tmp_path / "ckpt"), tmp_path / "engine", "fp8", settings)
    assert plan.world_size == 8 and plan.quant_algo == "FP8"
    assert plan.llm_arguments() == {"tensor_parallel_size": 4, "pipeline_parallel_size": 2, "max_batch_size": 128,
                                    "max_input_len": 512, "max_seq_len": 640}
    serve = plan.serve_command()
    assert serve[:2] == ["trtllm-serve", str(tmp_path / "engine")]
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


@pytest.mark.e2e
def test_dag_asks_for_tp_times_pp_gpus_and_the_release_container(tmp_path, snakemake):
    config = {"engine": {"backend": "tensorrt_llm", "tensorrt_llm": {"tp_size": 4, "pp_size": 2, "max_seq_len": 512}},
              "cluster": {"gpus_per_node": 8}, "finetune": {"liger_kernel": False}}
    done = snakemake(tmp_path, config, "-n", "results/engine/tensorrt_llm/fp8")
    job = done.stdout.split("rule build_engine_tensorrt_llm:")[1].split("\n\n")[0]
    assert "gpu=8" in job
    for stage in ("engine", "benchmark"):  # build_engine_tensorrt_llm, benchmark_tensorrt_llm
        rules = (REPO / "rules" / f"{stage}.smk").read_text()
        assert rules.count("container:\n        TENSORRT_LLM_CONTAINER") == 1, f"rules/{stage}.smk: TensorRT-LLM runs in the pinned release container"
    assert 'TENSORRT_LLM_CONTAINER = f"docker://{TENSORRT_LLM_IMAGE}"' in (REPO / "rules" / "common.smk").read_text()


class GatedEngine:
    """A stand-in whose slow request (prompt [1]) cannot finish before the three fast ones (prompt [2]) have:
    admitted as others finish, the fast ones run one after another beside it; lock-step batches of 2 would wait
    for the slow request before starting the third fast one, and it would give up waiting."""

    def __init__(self):
        self.fast_finished, self.lock, self.all_fast = 0, threading.Lock(), threading.Event()
        self.slow_saw_all_fast = None

    def stream(self, request: GenerationRequest):
        for step in range(request.max_new_tokens):
            if request.prompt_ids[0] == 1 and step == request.max_new_tokens - 1:
                self.slow_saw_all_fast = self.all_fast.wait(timeout=30)
            yield 0
        if request.prompt_ids[0] == 2:
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


@pytest.fixture(scope="module")
def int4_engine(tiny_base, tmp_path_factory):
    engine_dir = tmp_path_factory.mktemp("engine") / "int4"
    onnxruntime.build(tiny_base, engine_dir, "int4_awq", "cpu", 32, 4, "sha")
    return engine_dir


@pytest.mark.parametrize("engine_fixture", ["ort_engine", "int4_engine"])
def test_batched_greedy_tokens_equal_one_request_alone(engine_fixture, request):
    engine = onnxruntime.OrtEngine(request.getfixturevalue(engine_fixture), max_batch_size=3)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.randrange(2, 80))] for _ in range(8)]
    alone = [list(engine.stream_alone(GenerationRequest(p, 24))) for p in prompts]
    batched = [None] * len(prompts)

    def run(i):
        batched[i] = list(engine.stream(GenerationRequest(prompts[i], 24)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]  # 8 requests, 3 slots
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert batched == alone


def test_a_request_joins_the_running_batch_without_waiting_for_it(ort_engine):
    """A static batch (og.Engine on CPU) would finish the long request before starting one submitted while it runs."""
    engine = onnxruntime.OrtEngine(ort_engine, max_batch_size=4)
    long_started, finished = threading.Event(), {}

    def run_long():
        count = 0
        for count, _ in enumerate(engine.stream(GenerationRequest([5, 6, 7], 400, min_new_tokens=400)), 1):
            long_started.set()
        finished["long"] = (time.perf_counter(), count)

    thread = threading.Thread(target=run_long)
    thread.start()
    long_started.wait(timeout=60)
    late = list(engine.stream(GenerationRequest([8, 9, 10], 3, min_new_tokens=3)))
    finished["late"] = (time.perf_counter(), len(late))
    thread.join()
    assert finished["long"][1] == 400 and finished["late"][1] == 3
    assert finished["late"][0] < finished["long"][0]


def test_streams_stop_early_and_refuse_what_cannot_fit(ort_engine):
    engine = onnxruntime.OrtEngine(ort_engine, max_batch_size=2)
    abandoned = engine.stream(GenerationRequest([5, 6, 7], 300))
    next(abandoned)
    abandoned.close()  # the caller went away: its slot frees
    assert len(list(engine.stream(GenerationRequest([5, 6, 7], 5, min_new_tokens=5)))) == 5
    context = json.loads((ort_engine / "genai_config.json").read_text())["model"]["context_length"]
    with pytest.raises(ValueError, match=rf"3 prompt tokens plus max_new_tokens {context} exceed the engine's context length {context}"):
        engine.stream(GenerationRequest([5, 6, 7], context))
    with pytest.raises(ValueError, match="the prompt is empty"):
        GenerationRequest([], 5)
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        onnxruntime.OrtEngine(ort_engine, max_batch_size=0)
    batcher = weakref.ref(engine.batcher)
    del engine  # e.g. the gateway swapped in a newly deployed engine: the old one's loop stops and frees it
    gc.collect()
    assert batcher() is None
