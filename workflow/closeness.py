"""Closeness of a candidate (a quantized model, a built engine) to the fine-tuned model it was made from, and its gate.

    compare(model_logits(finetuned), model_logits(quantized), rows)    # rows of the test split (input_ids, labels)

Teacher-forced on the test split's reference answers: both models read the same tokens (prompt, then the reference
answer), and at every answer position we compare the next-token distributions: next-token agreement (their argmax is
the same token), mean KL(fine-tuned || candidate) per answer token (nats), and the perplexity ratio (the candidate's
perplexity of the reference answer tokens over the fine-tuned model's, on the same tokens). Unlike task accuracy these
move with every quantization error, also where the fine-tuned model answers nothing right or the test split is small.

The reference is recomputed row by row beside the candidate (one forward each): nothing of vocabulary size is kept
between rows, so memory is one row's logits, at the cost of holding the fine-tuned model beside the candidate.
Rows are capped by quantize.closeness_rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from workflow.evaluate import gate_check

if TYPE_CHECKING:
    from workflow.config import EngineConfig, QuantizeConfig

Logits = Callable[[list[int]], torch.Tensor]
"""Token ids -> next-token logits at every position, (len(ids), vocab)."""

IGNORE = -100
"""The label of a token that is not part of the answer (prompt, template)."""

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def model_logits(model) -> Logits:
    """A transformers causal LM's logits, on its own device, in its own dtype (compare takes the answer positions
    to the CPU in float64)."""
    @torch.inference_mode()
    def logits(ids: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([ids], device=model.device)).logits[0]

    return logits


def onnx_logits(engine_dir: str | Path, provider: str = "cpu") -> Logits:
    """An ONNX Runtime GenAI engine's logits: one forward of its decoder over the whole sequence with an empty
    key/value cache (what the engine's own prefill computes)."""
    import onnxruntime as ort

    engine_dir = Path(engine_dir)
    decoder = json.loads((engine_dir / "genai_config.json").read_text())["model"]["decoder"]
    providers = ["CUDAExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(engine_dir / decoder.get("filename", "model.onnx")), providers=providers)
    shape = (1, decoder["num_key_value_heads"], 0, decoder["head_size"])
    empty = {}
    for item in session.get_inputs():
        if item.name.startswith("past_key_values"):
            if item.type not in ORT_TYPES:
                raise ValueError(f"closeness: {engine_dir} takes its key/value cache as {item.type}; only "
                                 f"{', '.join(ORT_TYPES)} are read here")
            empty[item.name] = np.zeros(shape, ORT_TYPES[item.type])
    names = {item.name for item in session.get_inputs()}

    def logits(ids: list[int]) -> torch.Tensor:
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)} | empty
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        return torch.from_numpy(np.asarray(session.run(["logits"], feeds)[0][0], np.float32))

    return logits


def engine_logits(engine_dir: str | Path, settings: EngineConfig) -> Logits:
    """A built engine's logits: ONNX Runtime's decoder run directly, the PyTorch engine's model, TensorRT-LLM's context
    logits."""
    if settings.backend == "onnxruntime":
        return onnx_logits(engine_dir, settings.onnxruntime.execution_provider)
    if settings.backend == "pytorch":
        from workflow.engine.pytorch import here
        from workflow.generation import load_model

        return model_logits(load_model(engine_dir, here()))
    from workflow.engine.tensorrt_llm import TrtllmEngine

    return TrtllmEngine(engine_dir).context_logits


def answer_positions(labels: list[int]) -> list[int]:
    """Positions whose next token is an answer token (the logits there predict it)."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]


def compare(reference: Logits, candidate: Logits, rows: list[dict]) -> dict:
    """next_token_agreement, mean_kl and perplexity_ratio of candidate against reference over the answer tokens of
    rows (each with input_ids and labels), and how many tokens and rows they cover."""
    same, kl, nll_reference, nll_candidate, tokens, used = 0, 0.0, 0.0, 0.0, 0, 0
    for row in rows:
        ids, positions = row["input_ids"], answer_positions(row["labels"])
        if not positions:
            continue
        p, q = (logits(ids)[positions].to("cpu", torch.float64) for logits in (reference, candidate))
        if p.shape != q.shape:
            raise ValueError(f"closeness: the candidate's logits are {tuple(q.shape)}, the fine-tuned model's {tuple(p.shape)} "
                             "(a different vocabulary?)")
        p, q = p.log_softmax(-1), q.log_softmax(-1)
        targets = torch.tensor([ids[t + 1] for t in positions]).unsqueeze(-1)
        same += int((p.argmax(-1) == q.argmax(-1)).sum())
        kl += float((p.exp() * (p - q)).sum())
        nll_reference -= float(p.gather(-1, targets).sum())
        nll_candidate -= float(q.gather(-1, targets).sum())
        tokens, used = tokens + len(positions), used + 1
    if not tokens:
        raise ValueError("closeness: no row of the test split has answer tokens (labels other than -100)")
    return {"next_token_agreement": same / tokens, "mean_kl": max(kl / tokens, 0.0),
            "perplexity_ratio": math.exp((nll_candidate - nll_reference) / tokens), "closeness_tokens": tokens, "closeness_rows": used}


def closeness_checks(scheme: str, measured: dict, max_kl: float, min_agreement: float) -> list[dict]:
    """The closeness gate as record_gate checks: mean KL <= quantize.max_kl.<scheme> and next-token agreement >=
    quantize.min_agreement.<scheme>; each detail names the number, the key and the threshold."""
    kl, agreement = measured["mean_kl"], measured["next_token_agreement"]
    kl_ok, agreement_ok = kl <= max_kl + 1e-12, agreement >= min_agreement - 1e-12
    return [
        {"name": f"mean KL <= quantize.max_kl.{scheme}", "passed": kl_ok, "value": kl, "threshold": max_kl,
         "detail": f"{scheme}: mean KL {kl:.4f} {'<=' if kl_ok else '>'} quantize.max_kl.{scheme} {max_kl:g}"},
        {"name": f"next-token agreement >= quantize.min_agreement.{scheme}", "passed": agreement_ok, "value": agreement,
         "threshold": min_agreement,
         "detail": f"{scheme}: next-token agreement {agreement:.4f} {'>=' if agreement_ok else '<'} "
                   f"quantize.min_agreement.{scheme} {min_agreement:g}"},
    ]


def gated(accuracy: dict, checks: list[dict], measured: dict) -> dict:
    """The accuracy gate's record with the closeness figures and checks: passed only when every gate passed, and the
    reason names what failed (or, when all passed, every gate's numbers)."""
    failed = ([accuracy["reason"]] if not accuracy["passed"] else []) + [c["detail"] for c in checks if not c["passed"]]
    reason = "; ".join(failed) if failed else "; ".join([accuracy["reason"], *(c["detail"] for c in checks)])
    return accuracy | measured | {"accuracy_passed": accuracy["passed"], "closeness_passed": all(c["passed"] for c in checks),
                                  "max_kl": checks[0]["threshold"], "min_agreement": checks[1]["threshold"],
                                  "passed": not failed, "reason": reason}


def scheme_gate(scheme: str, accuracy: dict, measured: dict, gates: QuantizeConfig) -> tuple[dict, list[dict]]:
    """A quantized model's or an engine's record (accuracy_gate's with the closeness figures, gated) and its
    record_gate checks: accuracy loss, mean KL, next-token agreement, against the scheme's quantize.* thresholds."""
    checks = closeness_checks(scheme, measured, getattr(gates.max_kl, scheme), getattr(gates.min_agreement, scheme))
    return gated(accuracy, checks, measured), [gate_check(accuracy, f"quantize.max_accuracy_loss.{scheme}"), *checks]


def metrics(measured: dict) -> dict[str, float]:
    """The figures as MLflow metrics."""
    return {key: float(measured[key]) for key in ("next_token_agreement", "mean_kl", "perplexity_ratio", "closeness_tokens")}


def text(measured: dict) -> str:
    return (f"next-token agreement {measured['next_token_agreement']:.4f}, mean KL {measured['mean_kl']:.4f}, "
            f"perplexity ratio {measured['perplexity_ratio']:.4f} over {measured['closeness_tokens']} answer tokens")
