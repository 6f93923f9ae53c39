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

from workflow.config import OPTIMIZERS, FinetuneConfig

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
    """Each decoder layer compiled (compile_decoder_layers)."""
    dataloader_workers: int
    pin_memory: bool
    skipped: tuple[str, ...]
    """Why a requested setting does not apply on this device, one line each."""

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "skipped"}

    @property
    def liger_kernel_config(self) -> dict:
        """Which Liger kernels to patch in: with compiled layers only the fused linear cross-entropy."""
        return {"rope": False, "rms_norm": False, "swiglu": False} if self.torch_compile else {}


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
    # Compiled decoder layers get Inductor's fusions (norms, SwiGLU, RoPE, residual adds); Liger keeps the fused
    # linear cross-entropy outside them (Liger's kernels under a whole-model torch.compile gave NaN losses).
    compile_layers = cfg.torch_compile
    if compile_layers and cfg.zero_stage == 3:
        # ZeRO-3 swaps in its own linear function, whose parameter ids become compile guards: a recompile per
        # layer, then eager fallback (measured on an H200: 55.2k tokens/s compiled vs 59.3k eager).
        skipped.append("torch_compile: ZeRO-3's parameter handling recompiles every layer; running eagerly")
        compile_layers = False
    workers = cfg.dataloader_workers
    if workers and not cuda:
        skipped.append(f"dataloader_workers: {workers} -> 0 on CPU, where the ranks already use every core")
        workers = 0
    return SpeedSettings(attention, liger, OPTIMIZERS[cfg.optimizer], compile_layers, workers, cuda, tuple(skipped))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes Transformers keeps whole when splitting it (_no_split_modules)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer's forward (regional compilation: the layers share one compiled code).

    Only forward is compiled, so module hooks stay eager around it and parameter names (checkpoints) are unchanged.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"finetune.torch_compile: found no decoder layers to compile in {type(model).__name__} "
                         "(it names none in _no_split_modules); set finetune.torch_compile: false")
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    return len(layers)


def _varlen_kernel():
    """torch's varlen FlashAttention and how this torch release spells causality, GQA and the scale."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params, "scale" in params


@torch.compiler.disable
def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Causal attention within each packed sequence: one FlashAttention launch over the whole packed row.

    query/key/value come as (1, heads, tokens, head_dim); the sequence boundaries (cu_seq_lens_q) and the
    longest sequence (max_length_q) come from DataCollatorWithFlattening(return_flash_attn_kwargs=True).
    Runs eagerly inside a compiled layer: the boundaries change with every batch.
    """
    if cu_seq_lens_q is None:
        # A micro-batch whose rows share one length comes stacked, not packed (batches.PaddingFree): no padding
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
