"""The fine-tune's speed settings resolved for the device a rank runs on, and the packed (varlen) attention.

On a CUDA GPU the defaults turn on Liger's fused Triton kernels, torch's fused AdamW, padding-free packing
with FlashAttention over the packed sequence boundaries (torch.nn.attention.varlen), pinned memory and
dataloader workers. On a CPU the GPU-only parts are skipped with a note in the log, and the rest runs as is.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import asdict, dataclass

import torch

from workflow.finetune.config import OPTIMIZERS, FinetuneConfig

VARLEN = "varlen"
"""The attn_implementation name the varlen attention is registered under in Transformers."""


@dataclass(frozen=True)
class SpeedSettings:
    attention: str
    """The attn_implementation the model is loaded with."""
    liger_kernel: bool
    optimizer: str
    """The Transformers optimizer name."""
    torch_compile: bool
    dataloader_workers: int
    pin_memory: bool
    skipped: tuple[str, ...]
    """Why a requested setting does not apply on this device, one line each."""

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "skipped"}


def varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve(cfg: FinetuneConfig, cuda: bool) -> SpeedSettings:
    """What each speed setting means on this device; a setting the device cannot honour is skipped with its reason."""
    skipped = []
    attention = cfg.attention
    if attention == "auto":
        attention = VARLEN if cuda and cfg.packing and varlen_available() else "sdpa"
    elif attention == VARLEN and not cuda:
        raise ValueError("finetune.attention varlen runs FlashAttention kernels and needs a CUDA GPU (found none); use auto or sdpa")
    elif attention == VARLEN and not varlen_available():
        raise ValueError(f"finetune.attention varlen needs torch.nn.attention.varlen (torch >= 2.9; found torch {torch.__version__}); use auto or sdpa")
    liger = cfg.liger_kernel
    if liger and not cuda:
        skipped.append("liger_kernel: Liger's Triton kernels need a CUDA GPU; using the model's own layers")
        liger = False
    elif liger and importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("finetune.liger_kernel is true but the liger-kernel package is not installed; "
                         "pip install liger-kernel==0.8.5, or set finetune.liger_kernel: false")
    compile_model = cfg.torch_compile
    if compile_model and not cuda:
        skipped.append("torch_compile: compiled training is only used on CUDA GPUs; running eagerly")
        compile_model = False
    elif compile_model and liger:
        # Measured on an H200 (torch 2.11, Liger 0.8.5): Dynamo fails to trace Liger's Triton kernels and the loss is NaN.
        raise ValueError("finetune.torch_compile with liger_kernel gives NaN losses (Liger's Triton kernels do not "
                         "compile under torch 2.11); set torch_compile: false, or liger_kernel: false to compile")
    workers = cfg.dataloader_workers
    if workers and not cuda:
        skipped.append(f"dataloader_workers: {workers} -> 0 on CPU, where the ranks already use every core")
        workers = 0
    return SpeedSettings(attention, liger, OPTIMIZERS[cfg.optimizer], compile_model, workers, cuda, tuple(skipped))


def _varlen_kernel():
    """torch's varlen FlashAttention and how this torch release spells causality, GQA and the scale."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params, "scale" in params


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Causal attention within each packed sequence: one FlashAttention launch over the whole packed row.

    query/key/value come as (1, heads, tokens, head_dim); the sequence boundaries (cu_seq_lens_q) and the
    longest sequence (max_length_q) come from DataCollatorWithFlattening(return_flash_attn_kwargs=True).
    """
    if cu_seq_lens_q is None:
        # A micro-batch whose rows share one length comes stacked, not packed (train.PaddingFree): no padding
        # and no boundaries, so plain causal SDPA applies (cuDNN's fused attention on Hopper).
        if attention_mask is not None:
            raise ValueError("finetune: varlen attention got a padded batch; it needs finetune.packing: true")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(f"finetune: varlen attention has no attention dropout (the model asks for {dropout})")
    kernel, windowed, has_gqa, has_scale = _varlen_kernel()
    batch, heads, tokens, head_dim = query.shape
    q = query.transpose(1, 2).reshape(batch * tokens, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * tokens, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * tokens, value.shape[1], head_dim)
    options = {"window_size": (-1, 0)} if windowed else {"is_causal": True}
    if k.shape[1] != heads:
        if has_gqa:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    if has_scale:
        options["scale"] = scaling
    elif scaling is not None and abs(scaling - head_dim**-0.5) > 1e-6:
        raise ValueError(f"finetune: this torch's varlen attention has no scale argument and the model uses {scaling}")
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    out = kernel(q, k, v, cu, cu, int(max_length_q), int(max_length_q), **options)
    return out.view(batch, tokens, heads, head_dim), None


def register_varlen_attention() -> None:
    """Make attn_implementation="varlen" known to Transformers (no mask function: the kernel needs none)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
