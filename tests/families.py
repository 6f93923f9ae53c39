"""Tiny random-weight models of the architectures users bring, each with its family's published chat template.

    python tests/families.py OUT_DIR [FAMILY ...]   # writes OUT_DIR/<family>/ Hugging Face checkpoints

The templates are test data kept in tests/data/templates (sources in its README). The tokenizers are small BPE
vocabularies trained here on the arithmetic problems, with the family's own special tokens; the models are built
from the family's config class with random weights (no hub). Every linear in-feature is a multiple of 128 so that
INT4-AWQ can quantize them, except Qwen3's down_proj (intermediate 320): a model whose shape a scheme refuses.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from workflow.bootstrap.model import ASSISTANT, BOS, EOS, USER, train_tokenizer
from workflow.bootstrap.problems import make_problems

TEMPLATES = Path(__file__).parent / "data" / "templates"
R1_TOKENS = {"bos": BOS, "eos": EOS, "pad": "<｜▁pad▁｜>", "extra_special": (USER, ASSISTANT)}
QWEN_TOKENS = {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "extra_special": ("<|im_start|>",)}
LLAMA3_TOKENS = {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>",
                 "extra_special": ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>")}


@dataclass(frozen=True)
class Family:
    architecture: str
    template: str
    tokens: dict
    shape: dict = field(default_factory=dict)
    style: str = ""
    """The chat-format style workflow.chat picks for the template."""


FAMILIES = {
    # DeepSeek-R1-Distill-Qwen: Qwen2 with q/k/v biases and untied embeddings, R1's template and tokens.
    "r1-distill-qwen": Family("qwen2", "deepseek_r1_distill.jinja", R1_TOKENS, style="think"),
    # DeepSeek-R1-Distill-Llama: Llama with the same template.
    "r1-distill-llama": Family("llama", "deepseek_r1_distill.jinja", R1_TOKENS, style="think"),
    # Llama-3.x-Instruct: its own template, which knows no reasoning (it is written inline).
    "llama3-instruct": Family("llama", "llama3_1.jinja", LLAMA3_TOKENS, style="inline"),
    # Qwen3: q/k norms, the thinking template that renders the last turn's reasoning_content in place.
    "qwen3": Family("qwen3", "qwen3.jinja", QWEN_TOKENS, {"intermediate_size": 320}, style="in_place"),
}


def make(name: str, out_dir: str | Path, seed: int = 0, shape: dict | None = None) -> Path:
    """Save a tiny checkpoint of family `name` (tokenizer with its template, random weights) to out_dir; `shape`
    overrides the tiny shape (e.g. max_position_embeddings; benchmarks/gpu_dag.sh builds the Qwen2-1.5B shape with it)."""
    family, out_dir = FAMILIES[name], Path(out_dir)
    problems = make_problems(400, seed=seed + 99)
    texts = [p.as_text() for p in problems] + [json.dumps(p.as_chat()) for p in problems[:100]]
    tokenizer = train_tokenizer(texts, 512, chat_template=(TEMPLATES / family.template).read_text(), **family.tokens)
    shape = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024} | family.shape | (shape or {})
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False}
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                 "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family.architecture]
    extra = {"head_dim": 32} if family.architecture == "qwen3" else {}
    torch.manual_seed(seed)
    model = model_class(config_class(**shape, **ids, **extra))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for family_name in sys.argv[2:] or FAMILIES:
        print(make(family_name, root / family_name))
