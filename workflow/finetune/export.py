"""export: the final checkpoint as a self-describing Hugging Face model folder.

    snakemake results/model/config.json

Full fine-tunes are consolidated from DeepSpeed's fp32 master shards (ZeRO 1-3 gathered into one state
dict); LoRA adapters are merged into the base. The folder gets safetensors weights, config, tokenizer
with its chat template, and ft2prod.json: the resolved training settings and the step it came from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workflow.config import FinetuneConfig

if TYPE_CHECKING:
    from workflow.tracking import Tracking

log = logging.getLogger(__name__)


def consolidated_state_dict(checkpoint: Path, cfg: FinetuneConfig) -> dict[str, torch.Tensor]:
    if cfg.zero_stage == 0:
        from safetensors.torch import load_file

        return load_file(checkpoint / "model.safetensors")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def load_trained(base_dir: Path, checkpoint: Path, cfg: FinetuneConfig) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if cfg.method == "lora":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
    state = consolidated_state_dict(checkpoint, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head is saved once, as the embedding; anything else missing means another model's checkpoint.
    missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export: checkpoint {checkpoint} does not match {base_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def export(base_dir: str | Path, summary_path: str | Path, out_dir: str | Path, cfg: FinetuneConfig, tracking: Tracking) -> Path:
    # MLflow is imported here: benchmarks/finetune_throughput.py consolidates through load_trained on GPU
    # hosts that have no MLflow.
    import mlflow

    from workflow.tracking import describe, job_run, log_model_dir

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    summary = json.loads(Path(summary_path).read_text())
    checkpoint = Path(summary["checkpoint"])
    with job_run(tracking, "export", {"finetune": cfg.model_dump(mode="json"), "checkpoint": str(checkpoint)}):
        model = load_trained(base_dir, checkpoint, cfg)
        model = model.to(torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
        described = {
            "base_model": str(base_dir.resolve()),
            "checkpoint": str(checkpoint),
            "global_step": summary["global_step"],
            "train_loss": summary["train_loss"],
            "finetune": cfg.model_dump(mode="json"),
        }
        (out_dir / "ft2prod.json").write_text(json.dumps(described, indent=2))
        digest = log_model_dir(out_dir, "model")
        parameters = sum(p.numel() for p in model.parameters())
        mlflow.log_metric("parameters", parameters)
        describe(f"Step {summary['global_step']} exported to `{out_dir}`: {parameters:,} parameters, tree sha256 `{digest}` "
                 "(per-file digests in `model.sha256.json`; no weights in MLflow).")
        log.info("exported step %d to %s (sha256 %s)", summary["global_step"], out_dir, digest)
        return out_dir
