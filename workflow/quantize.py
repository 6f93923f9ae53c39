"""quantize/{scheme}: post-training quantization with NVIDIA ModelOpt, calibrated on the user's training split.

    snakemake results/quantize/int4_awq/quantize.json

Each scheme writes a unified Hugging Face checkpoint (what TensorRT-LLM >= 1.2 and vLLM load, with
hf_quant_config.json naming the recipe) and the ModelOpt state, from which evaluate_quantized rebuilds the
quantized model in memory. (A ModelOpt export reloaded by plain transformers on CPU would load raw
fp8/int8 values as weights: never evaluate that way.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import mlflow
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from workflow import closeness, exported
from workflow.capacity import Architecture, generation_memory
from workflow.config import Cluster, EvalConfig, QuantizeConfig
from workflow.data import read_split
from workflow.evaluate import accuracy_gate, evaluate_model, journal_for, log_results, planned_figures
from workflow.generation import load_model, model_device, model_dtype, peak_gib
from workflow.progress import Progress
from workflow.schemes import SCHEMES
from workflow.tracking import Tracking, describe, dir_bytes, job_run, record_gate

log = logging.getLogger(__name__)



class QuantizeError(ValueError):
    """A model that cannot take a scheme, or a scheme that does not exist."""


def linear_in_features(config) -> dict[str, int]:
    """In-features of each kind of projection in a decoder-only transformer, from its config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "hidden_size (q/k/v, gate/up, lm_head)": config.hidden_size,
        "num_attention_heads x head_dim (o_proj)": config.num_attention_heads * head_dim,
        "intermediate_size (down_proj)": config.intermediate_size,
    }


def check_quantizable(model_dir: str | Path, scheme: str) -> int:
    """The block size the scheme takes on this model's shapes; refuses, before any calibration, a scheme they cannot
    take (the plan drops such a scheme before the DAG starts; this guards direct calls)."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"quantize: unknown scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    features = linear_in_features(AutoConfig.from_pretrained(model_dir))
    block = SCHEMES[scheme].block_for(list(features.values()))
    if block is None:
        sizes = (SCHEMES[scheme].block, *SCHEMES[scheme].fallback_blocks)
        found = ", ".join(f"{name} = {n}" for name, n in features.items() if any(n % b for b in sizes))
        raise QuantizeError(f"quantize: {scheme} needs in-features divisible by {' or '.join(map(str, sizes))} (got {found}); "
                            "pick another scheme or model")
    return block


def recipe(scheme: str, block: int) -> dict:
    """The scheme's ModelOpt config with its weight blocks of `block` input features (AWQ's group size)."""
    import copy

    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, SCHEMES[scheme].modelopt))
    for entry in cfg["quant_cfg"]:
        sizes = (entry.get("cfg") or {}).get("block_sizes") if isinstance(entry.get("cfg"), dict) else None
        if sizes and -1 in sizes:
            sizes[-1] = block
    return cfg


def calibration_rows(train_path: str | Path, n: int) -> tuple[list[list[int]], str]:
    """The first n training rows' token ids, and a digest of exactly what was used."""
    ids = [row["input_ids"] for row in read_split(train_path, n)]
    return ids, hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def quantized_model(model_dir: str | Path, scheme: str, calibration: list[list[int]] | None = None, state: str | Path | None = None,
                    block: int | None = None, device: torch.device = torch.device("cpu")):
    """The model with the scheme applied: calibrated anew from `calibration` (in weight blocks of `block`, the
    scheme's own by default), or restored from a saved `state`; in fp32 on the CPU, in the model's half precision on
    a GPU (workflow.generation.model_dtype)."""
    if SCHEMES[scheme].modelopt is None:  # the baseline: no ModelOpt import (12 s of a 2-core machine's job start-up)
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq

    model = load_model(model_dir, device)
    if state is not None:
        return mto.restore(model, str(state))

    def forward_loop(m) -> None:
        with torch.inference_mode(), Progress(len(calibration), f"calibration {scheme}", unit="sample") as shown:
            for ids in shown.counted(calibration):
                m(input_ids=torch.tensor([ids], device=device))

    return mtq.quantize(model, recipe(scheme, block or SCHEMES[scheme].block), forward_loop=forward_loop)


def calibration_memory(model_dir: str | Path, calibration: list[list[int]], device: torch.device, cluster: Cluster) -> dict:
    """On a GPU, the planner's figure for calibration: the weights in their half precision and one calibration row's
    forward (a batch of one through generation_memory's prefill, its cache and logits)."""
    if device.type != "cuda" or not calibration:
        return {}
    arch = Architecture.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))
    longest = max(map(len, calibration))
    return planned_figures(generation_memory(arch, 1, longest, longest, model_dtype(model_dir, device).itemsize, cluster))


def quantize(model_dir: str | Path, train_path: str | Path, out_dir: str | Path, scheme: str, cfg: QuantizeConfig, tracking: Tracking,
             cluster: Cluster = Cluster()) -> dict:
    """Quantize model_dir with scheme into out_dir/checkpoint (+ out_dir/modelopt_state.pth); returns the record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with job_run(tracking, f"quantize/{scheme}", {"scheme": scheme, "calib_samples": cfg.calib_samples}):
        block = check_quantizable(model_dir, scheme)
        calibration, calib_digest = calibration_rows(train_path, cfg.calib_samples)
        device = model_device(cluster)
        model = quantized_model(model_dir, scheme, calibration, block=block, device=device)
        checkpoint = out_dir / "checkpoint"
        if SCHEMES[scheme].modelopt is None:
            model.save_pretrained(checkpoint)
        else:
            import modelopt.torch.opt as mto
            from modelopt.torch.export import export_hf_checkpoint

            mto.save(model, str(out_dir / "modelopt_state.pth"))
            export_hf_checkpoint(model, export_dir=checkpoint)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(checkpoint)
        export = exported.check(checkpoint, scheme)  # read as TensorRT-LLM's and vLLM's ModelOpt loaders read it
        recipe_file = checkpoint / "hf_quant_config.json"
        record = {
            "scheme": scheme,
            "description": SCHEMES[scheme].description,
            "block": block,
            "recipe": json.loads(recipe_file.read_text())["quantization"] if recipe_file.exists() else {"quant_algo": None},
            "calib_samples": len(calibration) if SCHEMES[scheme].modelopt else 0,
            "calib_sha256": calib_digest if SCHEMES[scheme].modelopt else None,
            "checkpoint_bytes": dir_bytes(checkpoint),
            "export": export,
            "source_model": str(Path(model_dir).resolve()),
            "device": str(device),
            "gpu_peak_gib": peak_gib(device),
        } | calibration_memory(model_dir, calibration, device, cluster)
        (out_dir / "quantize.json").write_text(json.dumps(record, indent=2))
        mlflow.log_dict(record, "quantize.json")
        mlflow.log_metric("checkpoint_mb", record["checkpoint_bytes"] / 2**20)
        mlflow.set_tag("ft2prod.calib_sha256", record["calib_sha256"] or "none")
        describe(f"{record['description']}: recipe `{record['recipe'].get('quant_algo')}`, {record['calib_samples']} calibration rows "
                 f"(sha256 `{record['calib_sha256']}`), checkpoint **{record['checkpoint_bytes'] / 2**20:.2f} MB**.")
        log.info("quantized %s: %s", scheme, json.dumps(record))
        return record


def evaluate_quantized(model_dir: str | Path, quantized_dir: str | Path, test_path: str | Path, finetuned_path: str | Path,
                       out_path: str | Path, scheme: str, gates: QuantizeConfig, cfg: EvalConfig, tracking: Tracking,
                       cluster: Cluster = Cluster()) -> dict:
    """Score the quantized model itself (ModelOpt state restored in memory), measure its closeness to the fine-tuned
    model (workflow/closeness.py), and gate both: quantize.max_accuracy_loss, quantize.max_kl and
    quantize.min_agreement of the scheme.

    A failing scheme does not stop the DAG: it is dropped from engine building and selection, and the
    reason is in the log, the result file and MLflow.
    """
    quantized_dir = Path(quantized_dir)
    baseline = json.loads(Path(finetuned_path).read_text())["metrics"]["accuracy"]
    max_loss = getattr(gates.max_accuracy_loss, scheme)
    params = {"scheme": scheme, "max_accuracy_loss": max_loss, "max_kl": getattr(gates.max_kl, scheme),
              "min_agreement": getattr(gates.min_agreement, scheme), "closeness_rows": gates.closeness_rows, "evaluate": cfg.model_dump()}
    with job_run(tracking, f"evaluate_quantized/{scheme}", params):
        state, device = quantized_dir / "modelopt_state.pth", model_device(cluster)
        model = quantized_model(model_dir, scheme, state=state if state.exists() else None, device=device)
        metrics, results = evaluate_model(model_dir, test_path, cfg, model=model, cluster=cluster, journal_path=journal_for(out_path))
        measured = closeness.compare(closeness.model_logits(load_model(model_dir, device)), closeness.model_logits(model),
                                     read_split(test_path, gates.closeness_rows))
        record = json.loads((quantized_dir / "quantize.json").read_text())
        accuracy = accuracy_gate(scheme, metrics["accuracy"], baseline, max_loss)
        gate, checks = closeness.scheme_gate(scheme, accuracy, measured, gates)
        result = gate | {"format_adherence": metrics.get("format_adherence"), "perplexity": metrics["perplexity"],
                         "checkpoint_bytes": record["checkpoint_bytes"], "recipe": record["recipe"],
                         **{k: metrics[k] for k in ("gpu_planned_gib", "gpu_peak_gib", "gpu_batch") if k in metrics}}
        log_results(scheme, metrics, results, cfg.sample_generations)
        mlflow.log_metrics({"accuracy_loss": gate["accuracy_loss"], "checkpoint_mb": record["checkpoint_bytes"] / 2**20}
                           | closeness.metrics(measured))
        mlflow.set_tag("ft2prod.gate_reason", gate["reason"])
        record_gate(checks)
        describe(f"Quantized {scheme}: accuracy **{gate['accuracy']:.3f}** (fine-tuned {baseline:.3f}), {closeness.text(measured)}, "
                 f"checkpoint {record['checkpoint_bytes'] / 2**20:.2f} MB.\n\n"
                 f"Gate: **{'passed' if gate['passed'] else 'failed, scheme dropped'}** — {gate['reason']}.")
        (log.info if gate["passed"] else log.warning)("quantization gate %s: %s", "passed" if gate["passed"] else "FAILED, scheme dropped", gate["reason"])
        Path(out_path).write_text(json.dumps(result, indent=1))
        return result
