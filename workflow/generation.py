"""Batched greedy generation for the stages that run the model itself (evaluate_base, evaluate, quantize's
fake-quantized evaluation, evaluate_quantized): on a GPU when the config's cluster has GPUs and CUDA is present,
else on the CPU exactly as before.

On the GPU the model runs in its own dtype (bf16 unless the checkpoint says fp16), prompts are sorted longest first
(batches of like lengths waste little padding, and a batch that does not fit fails first), every batch has the same
size and a static KV cache of one length (transformers then compiles the decoding step once and reuses it), the
decoding step of a grouped-query model attends on the key/value heads (`PACKED`), and the batch size comes from the
planner's memory model (workflow.capacity.generation_memory). Each finished prompt is appended to a JSONL journal, so a
killed job resumes with the prompts it had not finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch

from workflow.capacity import GIB, Architecture, generation_memory
from workflow.config import Cluster
from workflow.progress import Progress

log = logging.getLogger(__name__)


def model_device(cluster: Cluster) -> torch.device:
    """cuda when the cluster declares GPUs and this process sees one; else cpu (CI, the embedded default)."""
    if cluster.gpus_per_node > 0:
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("cluster.gpus_per_node is %d but this process sees no CUDA device: running on the CPU", cluster.gpus_per_node)
    return torch.device("cpu")


def model_dtype(model_dir: str | Path, device: torch.device) -> torch.dtype:
    """fp32 on the CPU (as before); on a GPU the checkpoint's own half precision (bf16 unless it says fp16)."""
    if device.type == "cpu":
        return torch.float32
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return torch.float16 if str(config.get("dtype") or config.get("torch_dtype")) == "float16" else torch.bfloat16


PACKED = "sdpa_packed_decode"
"""The attn_implementation generation uses on a GPU: Transformers' SDPA, except that a one-token decoding step of a
grouped-query model attends on the key/value heads, the query heads of each group folded into the query length,
instead of repeating the cache for every query head. Transformers folds them itself only outside torch.compile, and
the static-cache decoding step is compiled: at batch 256 x 1,536 cached tokens of an 8B shape the repeated cache is
~200 GB of copies a step (a 169 ms step measured on an H200, docs/models.md)."""


def packed_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """(batch, heads, 1, dim) queries against (batch, kv_heads, length, dim) keys as (batch, kv_heads, group, dim):
    one attention over each key/value head for its whole group; any other step is Transformers' own SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = query.shape[2] != 1 or groups == 1 or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
    if plain or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(batch, heads // groups, groups, dim), key, value,
                                                           attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register_packed_attention() -> None:
    """Make attn_implementation=PACKED known to Transformers, with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED, packed_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)


def load_model(model_dir: str | Path, device: torch.device):
    """The model for generation: fp32 and Transformers' defaults on the CPU; on a GPU its half precision and PACKED."""
    from transformers import AutoModelForCausalLM

    dtype = model_dtype(model_dir, device)
    if device.type == "cpu":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    register_packed_attention()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=PACKED).to(device).eval()


def longest_first(prompts: list[list[int]]) -> list[int]:
    """Indices of the prompts, longest first; equal lengths keep their order."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def fitted_batch(arch: Architecture, cluster: Cluster, cache_len: int, prompt_len: int, dtype_bytes: int, prompts: int) -> int:
    """The largest batch (at most `prompts`) whose weights, static KV cache and prefill fit one GPU, from the
    planner's memory model; 1 if even that does not fit (the job then fails with CUDA's own out-of-memory error)."""
    def fits(batch: int) -> bool:
        return generation_memory(arch, batch, cache_len, prompt_len, dtype_bytes, cluster)["fits"]

    low, high = 1, max(1, prompts)
    if fits(high):
        return high
    while low < high:  # the largest batch that fits, by bisection (memory grows with the batch)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


class Journal:
    """Finished prompts of one generation job, one JSONL line each: {"index", "tokens", "ended"}. The first line
    names what was generated (a digest of the model, the prompts and the budget): a journal of other work is
    discarded, a torn last line (the job was killed mid-write) is ignored."""

    def __init__(self, path: str | Path | None, key: str) -> None:
        self.path, self.key = (Path(path) if path else None), key
        self.done: dict[int, tuple[list[int], bool]] = {}
        if self.path is None:
            return
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        if lines and self._header(lines[0]) == key:
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                    self.done[entry["index"]] = (entry["tokens"], entry["ended"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    break
            log.info("resuming from %s: %d prompts already generated", self.path, len(self.done))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"key": key}) + "\n")

    @staticmethod
    def _header(line: str) -> str | None:
        try:
            return json.loads(line).get("key")
        except (json.JSONDecodeError, AttributeError):
            return None

    def add(self, finished: dict[int, tuple[list[int], bool]]) -> None:
        self.done.update(finished)
        if self.path is None:
            return
        with self.path.open("a") as handle:
            for index, (tokens, ended) in finished.items():
                handle.write(json.dumps({"index": index, "tokens": tokens, "ended": ended}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def journal_key(model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int, variant: str = "") -> str:
    model = Path(model_dir)
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model.glob("*")) if p.is_file()]
    return hashlib.sha256(json.dumps([str(model.resolve()), stamp, prompts, max_new_tokens, variant]).encode()).hexdigest()


def until_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """The tokens before the first end-of-sequence token, and whether there was one."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i], True
    return tokens, False


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, pad_id: int, eos: set[int],
             journal: Journal | None = None, static_cache: bool = False) -> list[tuple[list[int], bool]]:
    """Greedy completions (tokens before EOS, stopped at EOS) of every prompt, in the prompts' order.

    Left-padded batches of `batch_size`, longest prompts first. With `static_cache` every batch is filled to
    `batch_size` (the last with copies of its last prompt, discarded) and the cache is sized for the longest prompt
    plus `max_new_tokens`, so the decoding step keeps one shape and compiles once."""
    journal = journal or Journal(None, "")
    todo = [i for i in longest_first(prompts) if i not in journal.done]
    cache_len = max((len(p) for p in prompts), default=0) + max_new_tokens
    device = next(model.parameters()).device
    extra = {"cache_implementation": "static", "max_cache_len": cache_len} if static_cache else {}
    with Progress(len(prompts), "generation", unit="prompt", initial=len(journal.done)) as shown:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            rows = [prompts[i] for i in chunk]
            if static_cache:
                rows += [rows[-1]] * (batch_size - len(rows))
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=sorted(eos) or None, **extra)
            new = out[:, width:].tolist()
            journal.add({index: until_eos(new[row], eos) for row, index in enumerate(chunk)})
            shown.update(len(chunk))
    return [journal.done[i] for i in range(len(prompts))]


def peak_gib(device: torch.device) -> float | None:
    """The most memory this process has held on the GPU so far, in GiB (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None


def cache_length(prompts: list[list[int]], max_new_tokens: int) -> int:
    return max((len(p) for p in prompts), default=0) + max_new_tokens


def batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


CPU_TOKENS_PER_S = 10.0
"""Output tokens a second that the runtime request assumes on CPUs (fp32, a 0.5-1B model on a few cores)."""
GPU_TOKENS_PER_S = 500.0
"""Output tokens a second that the runtime request assumes on one GPU: a quarter of the batched bf16 rate
measured for an 8B shape on an H200 (docs/models.md), to leave room for compiles, smaller batches and loading."""


def runtime_minutes(samples: int, max_new_tokens: int, on_gpu: bool, floor: int = 30) -> int:
    """Minutes a generating job asks its scheduler for: every sample's whole budget at the assumed rate, at least
    `floor` (loading, compiling, perplexity)."""
    rate = GPU_TOKENS_PER_S if on_gpu else CPU_TOKENS_PER_S
    return max(floor, math.ceil(samples * max_new_tokens / rate / 60 * 1.5))
