"""The quantize stage's calibration, carried to engines that quantize weights themselves (ONNX Runtime GenAI).

ModelOpt's AWQ (int4_awq) and SmoothQuant (int8_sq) calibrate one scale per input channel of every linear layer:
the layer computes (W / s)(x * s), so that weight and activation quantize better. The ONNX Runtime GenAI builder
quantizes the weights it is given (block-wise, round-to-nearest), so the scales reach it folded into the fine-tuned
fp32 weights, where they change nothing before quantization:

- q/k/v (after input_layernorm) and gate/up (after post_attention_layernorm): the norm's weight is multiplied by s,
  the layers' input columns divided by s. Layers that share a norm share one s, the mean of theirs (as ModelOpt's
  own export does for fused layers).
- o_proj: v_proj's output rows multiplied by s, o_proj's input columns divided by s; only when every attention head
  has its own key/value head. With grouped-query attention one v_proj row feeds several o_proj columns whose scales
  differ, so o_proj keeps its fine-tuned weights (recorded as skipped, with that reason).
- down_proj: up_proj's output rows multiplied by s (the MLP is act(gate) * up, linear in up), down_proj's columns
  divided by s.

`fold_calibration` writes the folded model and checks, in fp32, that it computes what the fine-tuned model does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workflow.schemes import SCHEMES

log = logging.getLogger(__name__)

EXACTNESS_TOLERANCE = 1e-4
"""Largest logit difference allowed between the folded and the fine-tuned model in fp32, relative to the largest
logit (at least 1): folding reorders fp32 rounding only."""


class CalibrationError(ValueError):
    """The calibration cannot be carried to this model (no scales, or a layout folding does not know)."""


@dataclass
class FoldReport:
    calibration: str
    """AWQ or SmoothQuant."""
    calib_sha256: str
    """Digest of the calibration rows, from the quantize stage's record."""
    folded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Layer -> why its scale was not folded (it is quantized round-to-nearest)."""
    max_logit_difference: float | None = None
    """fp32 logits of the folded model vs the fine-tuned one on a few prompts, relative to the largest logit (>= 1)."""

    def as_dict(self) -> dict:
        return asdict(self)


def calibrated_scales(model_dir: str | Path, quantized_dir: str | Path, scheme: str) -> dict[str, torch.Tensor]:
    """Linear layer name -> the per-input-channel scale the quantize stage calibrated (its ModelOpt state)."""
    from workflow.quantize import quantized_model

    state = Path(quantized_dir) / "modelopt_state.pth"
    if not state.exists():
        raise CalibrationError(f"build_engine: {quantized_dir} has no modelopt_state.pth; rerun quantize/{scheme}")
    model = quantized_model(model_dir, scheme, state=state)
    return {name: module.input_quantizer.pre_quant_scale.detach().float().clone()
            for name, module in model.named_modules()
            if hasattr(module, "input_quantizer") and module.input_quantizer.pre_quant_scale is not None}


@torch.no_grad()
def fold(model, scales: dict[str, torch.Tensor], report: FoldReport) -> None:
    """Fold the scales into model's weights in place (see the module's docstring)."""
    config = model.config
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise CalibrationError(f"build_engine: cannot carry calibration into {type(model).__name__} (no model.layers); "
                               "set engine.onnxruntime.calibration: rtn")
    one_kv_head_per_head = config.num_key_value_heads == config.num_attention_heads
    for index, layer in enumerate(layers):
        prefix = f"model.layers.{index}"
        attention, mlp = layer.self_attn, layer.mlp
        groups = [(layer.input_layernorm, {"self_attn.q_proj": attention.q_proj, "self_attn.k_proj": attention.k_proj,
                                           "self_attn.v_proj": attention.v_proj}),
                  (layer.post_attention_layernorm, {"mlp.gate_proj": mlp.gate_proj, "mlp.up_proj": mlp.up_proj})]
        for norm, linears in groups:
            found = [scales.get(f"{prefix}.{name}") for name in linears]
            if any(s is None for s in found):
                report.skipped.update({f"{prefix}.{name}": "no calibrated scale" for name in linears})
                continue
            common = torch.stack(found).mean(0)
            norm.weight.mul_(common.to(norm.weight.dtype))
            for name, linear in linears.items():
                linear.weight.div_(common[None, :].to(linear.weight.dtype))
                report.folded.append(f"{prefix}.{name}")
        grouped = (f"grouped-query attention ({config.num_attention_heads} heads share {config.num_key_value_heads} "
                   "key/value heads): one v_proj row feeds several o_proj columns with different scales; round-to-nearest")
        rows_before = {"self_attn.o_proj": (attention.o_proj, attention.v_proj, one_kv_head_per_head, grouped),
                       "mlp.down_proj": (mlp.down_proj, mlp.up_proj, True, "")}
        for name, (linear, before, exact, reason) in rows_before.items():
            scale = scales.get(f"{prefix}.{name}")
            if scale is None or not exact:
                report.skipped[f"{prefix}.{name}"] = reason if scale is not None else "no calibrated scale"
                continue
            before.weight.mul_(scale[:, None].to(before.weight.dtype))
            if before.bias is not None:
                before.bias.mul_(scale.to(before.bias.dtype))
            linear.weight.div_(scale[None, :].to(linear.weight.dtype))
            report.folded.append(f"{prefix}.{name}")


@torch.no_grad()
def max_logit_difference(model, reference, rows: list[list[int]]) -> float:
    """Largest |logit difference| over rows, relative to the reference's largest |logit| (at least 1)."""
    differences = []
    for ids in rows:
        expected = reference(input_ids=torch.tensor([ids])).logits
        got = model(input_ids=torch.tensor([ids])).logits
        differences.append(float((got - expected).abs().max()) / max(1.0, float(expected.abs().max())))
    return max(differences)


def fold_calibration(model_dir: str | Path, quantized_dir: str | Path, scheme: str, out_dir: str | Path,
                     check_rows: list[list[int]]) -> FoldReport:
    """Write model_dir with the quantize stage's scales for scheme folded in to out_dir; refuse if it no longer
    computes what model_dir does (fp32 logits on check_rows within EXACTNESS_TOLERANCE)."""
    method = SCHEMES[scheme].calibration if scheme in SCHEMES else None
    if method is None:
        carried = ", ".join(name for name, s in SCHEMES.items() if s.calibration)
        raise CalibrationError(f"build_engine: {scheme} has no calibration to carry (only {carried} do)")
    record = json.loads((Path(quantized_dir) / "quantize.json").read_text())
    report = FoldReport(method, record["calib_sha256"])
    scales = calibrated_scales(model_dir, quantized_dir, scheme)
    if not scales:
        raise CalibrationError(f"build_engine: the ModelOpt state of {scheme} in {quantized_dir} holds no calibrated scales")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fold(model, scales, report)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    report.max_logit_difference = max_logit_difference(model, reference, check_rows)
    if report.max_logit_difference > EXACTNESS_TOLERANCE:
        raise CalibrationError(f"build_engine: folding {report.calibration} scales changed the fp32 model (largest logit "
                               f"difference {report.max_logit_difference:.2e} > {EXACTNESS_TOLERANCE}); a bug, not your data")
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    log.info("folded %d %s scales into %s (skipped %d); largest fp32 logit difference %.2e", len(report.folded),
             report.calibration, out_dir, len(report.skipped), report.max_logit_difference)
    return report
