"""Make the embedded default base model: a small Llama with a DeepSeek-R1-style tokenizer, briefly pretrained.

    python -c "from workflow.bootstrap.model import make_base_model, BootstrapConfig; make_base_model(BootstrapConfig(), 'out')"

The base is pretrained on arithmetic word problems written as plain prose, so it knows numbers and
sums but has never seen the chat template or a think block: a weak model, not noise. Every linear
layer's in-features are a multiple of 128 so that INT4-AWQ (block size 128) can quantize it later.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from workflow.bootstrap.problems import make_problems
from workflow.config import BootstrapConfig
from workflow.progress import Progress

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>"
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"

# DeepSeek-R1's layout: the generation prompt opens the think block; an assistant turn renders its
# reasoning_content inside it, then the answer, then EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + THINK + "\n"
    "{% if message['reasoning_content'] is defined and message['reasoning_content'] %}"
    "{{ message['reasoning_content'] }}\n{% endif %}" + END_THINK + "\n\n"
    "{{ message['content'] }}" + EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + THINK + "\n{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int, bos: str | None = BOS, eos: str = EOS, pad: str = PAD,
                    extra_special: tuple[str, ...] = (USER, ASSISTANT), chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the given special tokens (DeepSeek-R1's by default) and think tags."""
    tokenizer = Tokenizer(models.BPE())
    # Digits one by one, as Llama and DeepSeek do: arithmetic stays learnable.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t in (bos, eos, pad, *extra_special) if t is not None]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # Think tags are whole tokens but not special, as in DeepSeek-R1: decoding keeps them.
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in (THINK, END_THINK)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=list(extra_special),
        chat_template=chat_template,
        model_max_length=1 << 30,
    )


def make_model(cfg: BootstrapConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def pretrain(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], cfg: BootstrapConfig) -> list[float]:
    """A short plain-PyTorch pretraining loop: one process, no DeepSpeed needed for a model this small."""
    ids = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False).input_ids, tokenizer.eos_token_id] for t in texts]
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.01)
    warmup = max(1, cfg.pretrain_steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.pretrain_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses = []
    with Progress(cfg.pretrain_steps, "bootstrap: pretraining", unit="step") as progress:
        for _ in range(cfg.pretrain_steps):
            batch = rng.sample(ids, cfg.batch_size)
            width = max(map(len, batch))
            input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in batch])
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch])
            labels = input_ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update(loss=losses[-1])
    model.eval()
    return losses


def make_base_model(cfg: BootstrapConfig, out_dir: str | Path) -> dict:
    """Train the tokenizer, build and pretrain the model, save a Hugging Face checkpoint to out_dir."""
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    problems = make_problems(cfg.pretrain_rows, seed=cfg.seed)
    texts = [p.as_text() for p in problems]
    # The tokenizer also sees rendered chats so the template's pieces get sensible merges.
    tokenizer = train_tokenizer(texts + [json.dumps(p.as_chat()) for p in problems[:500]], cfg.vocab_size)
    model = make_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("bootstrap: Llama with %.2fM parameters, vocabulary %d", n_params / 1e6, len(tokenizer))
    losses = pretrain(model, tokenizer, texts, cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {"parameters": n_params, "vocab_size": len(tokenizer), "final_loss": losses[-1], "config": cfg.model_dump()}
    (out_dir / "bootstrap.json").write_text(json.dumps(summary, indent=2))
    return {"summary": summary, "losses": losses}


def bootstrap(cfg: BootstrapConfig, out_dir: str | Path, tracking) -> dict:
    """make_base_model, tracked as the pipeline's `bootstrap` job."""
    import mlflow

    from workflow.tracking import describe, job_run

    with job_run(tracking, "bootstrap", {"bootstrap": cfg.model_dump()}):
        result = make_base_model(cfg, out_dir)
        for step, loss in enumerate(result["losses"], start=1):
            if step % 10 == 0 or step == len(result["losses"]):
                mlflow.log_metric("pretrain_loss", loss, step=step)
        mlflow.log_metrics({"parameters": result["summary"]["parameters"], "vocab_size": result["summary"]["vocab_size"]})
        mlflow.log_artifact(str(Path(out_dir) / "bootstrap.json"))
        describe(f"{result['summary']['parameters']:,} parameters, vocabulary {result['summary']['vocab_size']}, "
                 f"final pretraining loss **{result['losses'][-1]:.3f}** after {len(result['losses'])} steps.")
        return result["summary"]
