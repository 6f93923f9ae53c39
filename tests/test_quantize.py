import json

import families
import mlflow
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from workflow import exported
from workflow.bootstrap.problems import make_problems
from workflow.engine import onnxruntime
from workflow.engine.calibration import fold_calibration
from workflow.engine.interface import GenerationRequest
from workflow.evaluate import EvalConfig
from workflow.quantize import evaluate_quantized
from workflow.quantize import QuantizeConfig, QuantizeError, check_quantizable, quantize, quantized_model
from workflow.schemes import SCHEMES, buildable


def config_only_model(path, hidden=344, intermediate=1024):
    path.mkdir()
    LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=4, num_key_value_heads=4,
                num_hidden_layers=2, vocab_size=300).save_pretrained(path)
    return path


def test_int4_awq_refuses_a_model_whose_shapes_cannot_take_it(tmp_path):
    model = config_only_model(tmp_path / "m344")
    with pytest.raises(QuantizeError) as err:
        check_quantizable(model, "int4_awq")
    assert str(err.value) == (
        "quantize: int4_awq needs in-features divisible by 128 or 64 (got hidden_size (q/k/v, gate/up, lm_head) = 344, "
        "num_attention_heads x head_dim (o_proj) = 344); pick another scheme or model"
    )
    assert check_quantizable(model, "int8_sq") == 1  # per-channel INT8 takes any shape
    with pytest.raises(QuantizeError, match="unknown scheme 'int3'; allowed: bf16, fp8, int8_sq, int4_awq"):
        check_quantizable(model, "int3")


def test_refusal_comes_before_calibration_and_is_tracked(tmp_path, tracking):
    model = config_only_model(tmp_path / "m344")  # no weights: calibration would fail differently
    with pytest.raises(QuantizeError, match="int4_awq needs in-features divisible by 128"):
        quantize(model, tmp_path / "missing.jsonl", tmp_path / "out", "int4_awq", QuantizeConfig(), tracking)
    run = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'quantize/int4_awq'", output_format="list")[0]
    assert run.info.status == "FAILED"


def test_quantize_exports_recipe_and_restores_the_same_model(tiny_base, tmp_path, tracking):
    rows = [{"input_ids": list(range(5, 40)), "labels": list(range(5, 40))}] * 4
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = quantize(tiny_base, train, tmp_path / "q", "int8_sq", QuantizeConfig(calib_samples=3), tracking)
    assert record["recipe"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    assert record["calib_samples"] == 3 and len(record["calib_sha256"]) == 64
    assert (tmp_path / "q" / "checkpoint" / "hf_quant_config.json").exists()
    # the checkpoint as TensorRT-LLM's and vLLM's ModelOpt loaders read it: int8 weights, per-channel weight scales,
    # a per-tensor input scale and the SmoothQuant smoothing factors on every decoder-layer projection
    layers = 7 * AutoConfig.from_pretrained(tiny_base).num_hidden_layers
    assert record["export"] == {"format": "ModelOpt unified Hugging Face (quant_method modelopt)", "quant_algo": "W8A8_SQ_PER_CHANNEL",
                                "quantized_layers": layers, "weight_dtype": "I8", "group_size": None,
                                "scales": ["input_scale", "pre_quant_scale", "weight_scale"], "excluded": ["lm_head", "model.embed_tokens"]}
    ids = torch.tensor([list(range(5, 30))])
    calibrated = quantized_model(tiny_base, "int8_sq", [r["input_ids"] for r in rows[:3]])
    restored = quantized_model(tiny_base, "int8_sq", state=tmp_path / "q" / "modelopt_state.pth")
    plain = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (calibrated, restored, plain))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c), "quantization changed the computation"


def test_a_scheme_over_its_accuracy_loss_is_dropped_with_its_reason(tiny_base, tmp_path, tracking):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"input_ids": list(range(5, 30)), "labels": list(range(5, 30))}) + "\n")
    quantize(tiny_base, train, tmp_path / "q", "fp8", QuantizeConfig(calib_samples=1), tracking)
    test = tmp_path / "test.jsonl"
    row = {"messages": [{"role": "user", "content": "Ana has 2 pens."}, {"role": "assistant", "content": "The answer is 2."}],
           "answer": "The answer is 2.", "input_ids": list(range(5, 20)), "labels": [-100] * 10 + list(range(15, 20))}
    test.write_text(json.dumps(row) + "\n")
    finetuned = tmp_path / "finetuned.json"
    finetuned.write_text(json.dumps({"metrics": {"accuracy": 1.0}}))  # the reference the quantized model must keep
    result = evaluate_quantized(tiny_base, tmp_path / "q", test, finetuned, tmp_path / "fp8.json", "fp8",
                                QuantizeConfig(max_accuracy_loss={"fp8": 0.008}, max_kl={"fp8": 1e3}, min_agreement={"fp8": 0.0}),
                                EvalConfig(max_samples=1, max_new_tokens=8), tracking)
    assert result["passed"] is False
    assert result["reason"] == "fp8: accuracy loss +1.000 (1.000 -> 0.000) > quantize.max_accuracy_loss.fp8 0.008"
    assert json.loads((tmp_path / "fp8.json").read_text())["passed"] is False
    run = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'evaluate_quantized/fp8'", output_format="list")[0]
    assert run.data.tags["ft2prod.gate"] == "failed" and run.info.status == "FINISHED"


def test_int4_awq_takes_groups_of_64_where_128_does_not_divide(tmp_path):
    """A common small-model width, 576 (= 9 x 64): AWQ quantizes in groups of 64, for real with ModelOpt."""
    assert check_quantizable(config_only_model(tmp_path / "m576", hidden=576, intermediate=1536), "int4_awq") == 64
    assert check_quantizable(config_only_model(tmp_path / "m512", hidden=512, intermediate=1536), "int4_awq") == 128
    model = tmp_path / "m192"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=192, intermediate_size=384, num_attention_heads=3, num_key_value_heads=3,
                                 num_hidden_layers=1, vocab_size=300)).save_pretrained(model)
    quantized = quantized_model(model, "int4_awq", [[1, 2, 3, 4, 5, 6, 7, 8]], block=check_quantizable(model, "int4_awq"))
    blocks = {q.block_sizes.get(-1) for name, q in quantized.named_modules() if name.endswith("weight_quantizer") and q.is_enabled}
    assert blocks == {64}


# One family per architecture: quantization sees the layers, not the tokenizer or the template.
ARCHITECTURES = list({family.architecture: name for name, family in reversed(families.FAMILIES.items())}.values())


@pytest.mark.slow  # a quantization per architecture and scheme, and an engine build per calibrated one
@pytest.mark.parametrize("scheme", [name for name, scheme in SCHEMES.items() if not scheme.baseline])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_family_quantizes_and_its_calibration_folds_into_an_engine(family_dirs, name, scheme, tmp_path, tracking):
    """What differs by architecture between the quantize and build_engine stages (Qwen2's q/k/v biases and untied
    embeddings, Qwen3's q/k norms): each architecture's model quantizes with each scheme its shapes take, the
    quantized model computes, and a calibrated scheme's scales fold into an ONNX Runtime engine that generates. The
    DAG runs the stages on every scheme for the default model (test_workflow.py); the families run their DAG on the
    baseline only (test_families.py)."""
    model = family_dirs[name]
    try:
        check_quantizable(model, scheme)
    except QuantizeError as refused:  # Qwen3's intermediate 320 and int4_awq: test_chat checks the reason
        pytest.skip(str(refused))
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [tokenizer(p.as_text())["input_ids"][:48] for p in make_problems(4, seed=3)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"input_ids": ids, "labels": ids}) + "\n" for ids in rows))
    record = quantize(model, train, tmp_path / "q", scheme, QuantizeConfig(calib_samples=4), tracking)
    assert record["recipe"]["quant_algo"] and record["calib_samples"] == 4
    assert record["export"]["quant_algo"] == SCHEMES[scheme].quant_algo and record["export"]["quantized_layers"] > 0
    quantized = quantized_model(model, scheme, state=tmp_path / "q" / "modelopt_state.pth")
    with torch.no_grad():
        logits = quantized(input_ids=torch.tensor([rows[0]])).logits
    assert torch.isfinite(logits).all()
    if SCHEMES[scheme].calibration is None or not buildable(scheme, "onnxruntime", "cpu"):
        return
    report = fold_calibration(model, tmp_path / "q", scheme, tmp_path / "folded", rows[:2])
    manifest = onnxruntime.build(tmp_path / "folded", tmp_path / "engine", scheme, "cpu", 32, 4, "sha", calibration=report)
    assert manifest.calibration["calib_sha256"] == record["calib_sha256"]
    engine = onnxruntime.OrtEngine(tmp_path / "engine")
    assert len(list(engine.stream(GenerationRequest(rows[0][:16], 4, min_new_tokens=4)))) == 4


def test_an_export_the_gpu_loaders_would_misread_is_refused(tiny_base, tmp_path, tracking):
    """A checkpoint whose declaration or tensors differ from its scheme's format (a scale missing, the weights left in
    floating point, another quant_algo declared) fails the quantize stage, naming the tensor or the key."""
    from safetensors.torch import load_file, save_file

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"input_ids": list(range(5, 30)), "labels": list(range(5, 30))}) + "\n")
    record = quantize(tiny_base, train, tmp_path / "q", "fp8", QuantizeConfig(calib_samples=1), tracking)
    assert (record["export"]["weight_dtype"], record["export"]["scales"]) == ("F8_E4M3", ["input_scale", "weight_scale"])
    checkpoint = tmp_path / "q" / "checkpoint"
    assert exported.check(checkpoint, "fp8") == record["export"]
    with pytest.raises(exported.ExportError, match="quant_algo W8A8_SQ_PER_CHANNEL"):
        exported.check(checkpoint, "int8_sq")  # the fp8 checkpoint named as another scheme
    [weights] = checkpoint.glob("*.safetensors")
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("q_proj.weight_scale"))
    del tensors[name]
    layer = name.removesuffix(".weight_scale").replace("q_proj", "k_proj")
    tensors[f"{layer}.weight"] = tensors[f"{layer}.weight"].float()
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(exported.ExportError) as refused:
        exported.check(checkpoint, "fp8")
    assert f"{name} is missing" in str(refused.value) and f"{layer}.weight is F32, not F8_E4M3" in str(refused.value)
