"""Closeness to the fine-tuned model (workflow/closeness.py) on tiny real models, and its gate beside the accuracy gate."""

import json

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM

from workflow import closeness
from workflow.config import ConfigError, EngineConfig, EvalConfig, QuantizeConfig, check
from workflow.engine import onnxruntime
from workflow.quantize import evaluate_quantized, quantize
from workflow.schemes import SCHEMES

ROW = {"messages": [{"role": "user", "content": "Ana has 2 pens."}, {"role": "assistant", "content": "The answer is 2."}],
       "answer": "The answer is 2.", "input_ids": list(range(5, 25)), "labels": [-100] * 12 + list(range(17, 25))}
ROWS = [ROW, ROW | {"input_ids": list(range(40, 64)), "labels": [-100] * 10 + list(range(50, 64))}]


def fp32(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_a_model_against_itself_agrees_everywhere(tiny_base):
    model = fp32(tiny_base)
    measured = closeness.compare(closeness.model_logits(model), closeness.model_logits(model), ROWS)
    assert measured["next_token_agreement"] == 1.0
    assert measured["mean_kl"] == pytest.approx(0.0, abs=1e-9)
    assert measured["perplexity_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert measured["closeness_tokens"] == 8 + 14 and measured["closeness_rows"] == 2  # answer tokens only


def test_a_perturbed_copy_moves_every_figure(tiny_base):
    model, perturbed = fp32(tiny_base), fp32(tiny_base)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(torch.randn_like(parameter) * parameter.std() * 0.5)
    measured = closeness.compare(closeness.model_logits(model), closeness.model_logits(perturbed), ROWS)
    assert measured["next_token_agreement"] < 1.0
    assert measured["mean_kl"] > 0.01
    assert measured["perplexity_ratio"] != pytest.approx(1.0, abs=1e-3)
    again = closeness.compare(closeness.model_logits(model), closeness.model_logits(perturbed), ROWS)
    assert again == measured  # deterministic: the same rows give the same figures


def test_rows_without_answer_tokens_or_another_vocabulary_are_refused(tiny_base):
    model = fp32(tiny_base)
    same = closeness.model_logits(model)
    with pytest.raises(ValueError, match="no row of the test split has answer tokens"):
        closeness.compare(same, same, [ROW | {"labels": [-100] * 20}])
    with pytest.raises(ValueError, match=r"the candidate's logits are \(8, 7\).*a different vocabulary"):
        closeness.compare(same, lambda ids: torch.zeros(len(ids), 7), [ROW])


@pytest.mark.slow
def test_an_onnx_engine_is_measured_against_its_source(tiny_base, tmp_path):
    """The engine check's path: the fp32 engine is the model itself up to float error; the int4 one drifts."""
    model = fp32(tiny_base)
    onnxruntime.build(tiny_base, tmp_path / "fp32", "bf16", "cpu", 32, 4, "sha")
    onnxruntime.build(tiny_base, tmp_path / "int4", "int4_awq", "cpu", 32, 4, "sha")
    settings = EngineConfig()
    exact = closeness.compare(closeness.model_logits(model), closeness.engine_logits(tmp_path / "fp32", settings), ROWS)
    int4 = closeness.compare(closeness.model_logits(model), closeness.engine_logits(tmp_path / "int4", settings), ROWS)
    assert exact["next_token_agreement"] == 1.0 and exact["mean_kl"] < 1e-4
    assert int4["mean_kl"] > exact["mean_kl"]


def test_gate_names_each_number_and_key():
    measured = {"next_token_agreement": 0.8, "mean_kl": 0.41}
    checks = closeness.closeness_checks("int4_awq", measured, max_kl=0.25, min_agreement=0.9)
    assert [c["detail"] for c in checks] == ["int4_awq: mean KL 0.4100 > quantize.max_kl.int4_awq 0.25",
                                             "int4_awq: next-token agreement 0.8000 < quantize.min_agreement.int4_awq 0.9"]
    accuracy = {"passed": True, "reason": "int4_awq: accuracy loss +0.000 (0.500 -> 0.500) <= quantize.max_accuracy_loss.int4_awq 0.030"}
    gate = closeness.gated(accuracy, checks, measured)
    assert gate["passed"] is False and gate["accuracy_passed"] is True and gate["closeness_passed"] is False
    assert gate["reason"] == "; ".join(c["detail"] for c in checks)
    passing = closeness.gated(accuracy, closeness.closeness_checks("int4_awq", measured, 0.5, 0.8), measured)
    assert passing["passed"] is True and passing["reason"].startswith(accuracy["reason"] + "; int4_awq: mean KL 0.4100 <= ")


def test_a_scheme_close_in_accuracy_but_far_in_distribution_is_dropped(tiny_base, tmp_path, tracking):
    """The accuracy gate passes (max_accuracy_loss 1.0) while the closeness gate, set tight, refuses the scheme."""
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"input_ids": list(range(5, 30)), "labels": list(range(5, 30))}) + "\n")
    quantize(tiny_base, train, tmp_path / "q", "int8_sq", QuantizeConfig(calib_samples=1), tracking)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    finetuned = tmp_path / "finetuned.json"
    finetuned.write_text(json.dumps({"metrics": {"accuracy": 0.0}}))
    gates = QuantizeConfig(max_accuracy_loss={"int8_sq": 1.0}, max_kl={"int8_sq": 1e-6}, min_agreement={"int8_sq": 0.0},
                           closeness_rows=2)
    result = evaluate_quantized(tiny_base, tmp_path / "q", test, finetuned, tmp_path / "int8_sq.json", "int8_sq", gates,
                                EvalConfig(max_samples=1, max_new_tokens=4), tracking)
    assert result["accuracy_passed"] is True and result["passed"] is False
    assert result["mean_kl"] > 1e-6 and result["closeness_tokens"] == 22
    assert result["reason"] == f"int8_sq: mean KL {result['mean_kl']:.4f} > quantize.max_kl.int8_sq 1e-06"
    assert json.loads((tmp_path / "int8_sq.json").read_text())["passed"] is False
    run = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'evaluate_quantized/int8_sq'",
                             output_format="list")[0]
    assert run.data.tags["ft2prod.gate"] == "failed" and run.data.tags["ft2prod.gate_reason"] == result["reason"]
    assert {"next_token_agreement", "mean_kl", "perplexity_ratio"} <= set(run.data.metrics)
    checks = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/gate.json"))["checks"]
    assert [(c["name"], c["passed"]) for c in checks] == [
        ("accuracy loss <= quantize.max_accuracy_loss.int8_sq", True), ("mean KL <= quantize.max_kl.int8_sq", False),
        ("next-token agreement >= quantize.min_agreement.int8_sq", True)]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("max_kl", -0.1, "config: quantize.max_kl.{s}: Input should be greater than or equal to 0 (got -0.1)"),
    ("min_agreement", 1.5, "config: quantize.min_agreement.{s}: Input should be less than or equal to 1 (got 1.5)"),
    ("min_agreement", -1, "config: quantize.min_agreement.{s}: Input should be greater than or equal to 0 (got -1)"),
])
def test_bad_closeness_thresholds_name_the_key(key, value, message):
    scheme = next(iter(SCHEMES))
    with pytest.raises(ConfigError) as err:
        check({"quantize": {key: {scheme: value}}})
    assert message.format(s=scheme) in str(err.value).splitlines()


def test_closeness_defaults_come_from_the_scheme_table():
    filled = check({})
    assert filled["quantize"]["max_kl"] == {name: s.max_kl for name, s in SCHEMES.items()}
    assert filled["quantize"]["min_agreement"] == {name: s.min_agreement for name, s in SCHEMES.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the lent H200)")
def test_on_the_gpu_the_figures_match_the_cpu(tiny_base):
    """The DAG's CUDA path (model_device, the model's half precision): a bf16 model on the GPU against the fp32 one."""
    cpu, gpu = fp32(tiny_base), AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).to("cuda").eval()
    itself = closeness.compare(closeness.model_logits(gpu), closeness.model_logits(gpu), ROWS)
    assert itself["next_token_agreement"] == 1.0 and itself["mean_kl"] == pytest.approx(0.0, abs=1e-9)
    rounded = closeness.compare(closeness.model_logits(cpu), closeness.model_logits(gpu), ROWS)
    assert 0 < rounded["mean_kl"] < 0.01 and rounded["perplexity_ratio"] == pytest.approx(1.0, abs=0.05)
