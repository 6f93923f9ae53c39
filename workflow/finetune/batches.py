"""What the fine-tune's ranks read: the rendered split as token rows, and micro-batches made of them (padding-free
where attention allows, else right-padded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import DataCollatorWithFlattening

from workflow.config import FinetuneConfig
from workflow.finetune.speed import VARLEN, SpeedSettings


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, path: str | Path) -> None:
        with open(path, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle]
        self.rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def collator(cfg: FinetuneConfig, speed: SpeedSettings):
    if cfg.packing:
        # The varlen kernel reads the sequence boundaries the collator computes on the CPU, once per batch.
        return PaddingFree(DataCollatorWithFlattening(return_flash_attn_kwargs=speed.attention == VARLEN))
    return pad_to_longest


class PaddingFree:
    """Micro-batches without padding: rows of one length are stacked as they are, so attention runs batched
    (cuDNN's fused attention on an H100, faster than the varlen kernel: measured in docs/finetuning.md); rows of
    different lengths are packed into one row with restarting position ids and sequence boundaries.
    Both give the loss the same targets: the first token of each row is never a target."""

    def __init__(self, flatten: DataCollatorWithFlattening) -> None:
        self.flatten = flatten

    def __call__(self, rows: list[dict]) -> dict:
        if len({len(r["input_ids"]) for r in rows}) > 1:
            return self.flatten(rows)
        labels = torch.tensor([r["labels"] for r in rows])
        labels[:, 0] = -100
        return {"input_ids": torch.tensor([r["input_ids"] for r in rows]), "labels": labels}


def pad_to_longest(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded micro-batch: labels -100 and attention mask 0 on the padding (no tokenizer needed)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
