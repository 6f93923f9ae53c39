"""The memory model: what fine-tuning keeps resident per process (DeepSpeed's model states for the ZeRO stage and
offload settings, the gathered layer of ZeRO-3, activations with and without checkpointing) and what serving keeps
per GPU (weights at the scheme's precision, the KV cache over tp x pp), and the cheapest change that fits.

The plan stage (workflow.plan) checks a config with it before any job runs; the fine-tune resolves
gradient_checkpointing and micro_batch_fill auto with it on the GPU that trains (workflow.finetune.memory).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from workflow.config import LORA_MODULES, BootstrapConfig, Cluster, FinetuneConfig
from workflow.schemes import SCHEMES

GIB = 2**30
KV_BYTES = 2
"""The KV cache is kept in bf16 by every scheme here (FP8 KV caches are an engine option, not a scheme)."""
"""Bytes per linear-layer weight when served: int4 AWQ adds one fp16 scale per group of 128 weights. Embeddings,
lm_head and norms stay bf16 in every scheme (ModelOpt quantizes the decoder's linear layers)."""


class PlanError(RuntimeError):
    """The config does not fit the declared cluster; the message has the numbers and a change that fits."""


@dataclass(frozen=True)
class Architecture:
    """A dense decoder-only transformer (Llama, Qwen2, Mistral shapes), read from a Hugging Face config.json."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_positions: int | None = None
    """Longest sequence the model was built for (config.json's max_position_embeddings); None when it names none."""

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config.json") -> Architecture:
        if any(key in config for key in ("num_experts", "n_routed_experts", "num_local_experts")):
            raise PlanError(f"plan: {source} is a mixture-of-experts model; only dense decoders are modelled")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if k not in config]
        if missing:
            raise PlanError(f"plan: {source} lacks {', '.join(missing)}; expected a Hugging Face causal-LM config.json")
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 has biases on q, k and v; Llama names the flag attention_bias.
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            max_positions=config.get("max_position_embeddings"),
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim), "o_proj": (self.q_dim, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def params(self) -> dict[str, int]:
        linear = sum(a * b for a, b in self.linear_shapes().values())
        bias = self.q_dim + 2 * self.kv_dim if self.attention_bias else 0
        layer = linear + bias + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embed
        return {
            "total": self.num_layers * layer + embed + lm_head + self.hidden_size,
            "linear": self.num_layers * linear,
            "embed": embed,
            "lm_head": lm_head,
            "layer": layer,
            # ZeRO-3 gathers one module at a time: a whole decoder layer under zero_tuning auto (leaf modules), one
            # linear layer under stock; the embedding (or lm_head) or a decoder layer is the largest unit either way.
            "largest_layer": max(embed, layer),
        }

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        return self.num_layers * sum(r * (a + b) for name, (a, b) in self.linear_shapes().items() if name in targets)


def on_nodes(cluster: Cluster, nodes: int) -> Cluster:
    return cluster.model_copy(update={"nodes": nodes})


@dataclass(frozen=True)
class Training:
    method: str = "full"
    precision: str = "bf16"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool | str = False
    """False, True (every decoder layer) or "auto": on GPUs the fewest layers that make the run fit, none on CPUs."""
    ranks_per_node: int = 1
    nodes: int = 1
    lora_r: int = 16
    lora_targets: tuple[str, ...] = LORA_MODULES
    checkpointed_layers: int | None = None
    """How many decoder layers recompute their activations; None: from gradient_checkpointing."""
    liger_kernel: bool = False
    """Liger's kernels (CUDA only): fewer saved activations per layer, and a loss that never holds the logits."""
    zero_tuning: str = "auto"
    """auto or stock: sizes DeepSpeed's gradient buckets (workflow.finetune.config.zero_knobs)."""
    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step; None (not known to the plan rule) counts as several."""

    @property
    def ranks(self) -> int:
        return self.ranks_per_node * self.nodes

    @classmethod
    def of(cls, cfg: FinetuneConfig, seq_len: int, ranks_per_node: int, nodes: int = 1, liger_kernel: bool = False,
           gradient_accumulation_steps: int | None = None) -> Training:
        """What the memory model needs of the fine-tuning settings, for `seq_len`-token rows on these ranks."""
        return cls(method=cfg.method, precision=cfg.precision, zero_stage=cfg.zero_stage, offload_optimizer=cfg.offload_optimizer,
                   offload_params=cfg.offload_params, micro_batch_size=cfg.micro_batch_size, seq_len=seq_len,
                   gradient_checkpointing=cfg.gradient_checkpointing, ranks_per_node=ranks_per_node, nodes=nodes,
                   lora_r=cfg.lora.r, lora_targets=tuple(cfg.lora.target_modules), liger_kernel=liger_kernel,
                   zero_tuning=cfg.zero_tuning, gradient_accumulation_steps=gradient_accumulation_steps)

    def valid(self) -> bool:
        return not (self.offload_params and self.zero_stage != 3) and not (self.offload_optimizer and self.zero_stage == 0)


def model_states(total: int, trainable: int, largest_layer: int, t: Training) -> dict[str, float]:
    """Bytes per process of weights, gradients and optimizer states, as DeepSpeed keeps them.

    Mixed precision (bf16) with Adam is 16 bytes per trainable parameter (bf16 weights 2 + bf16 gradients 2 +
    fp32 master weights 4 + Adam moments 8), and DeepSpeed adds an fp32 copy of the gradient partition (4) that
    its optimizer steps on. In fp32 the weights are the master copy: 4 + 4 + 8. ZeRO-1 partitions the optimizer
    states over the data-parallel ranks, ZeRO-2 the gradients too, ZeRO-3 the weights too (and gathers one layer
    at a time). Offloading moves the optimizer states and fp32 gradients (and with offload_params the weights)
    to host memory. These are the figures of DeepSpeed's own estimators (tests compare them).
    """
    n, s = t.ranks, t.zero_stage
    w = 2 if t.precision == "bf16" else 4
    frozen = total - trainable
    per = {"weights": float(w * frozen / n if s == 3 else w * frozen)}
    trainable_weights = w * trainable / n if s == 3 else w * trainable
    grads = 0.0 if s == 3 else (w * trainable / n if s == 2 else w * trainable)
    fp32_grads = 4 * trainable / (n if s >= 1 else 1) if t.precision == "bf16" else 0.0
    optimizer = (12 if t.precision == "bf16" else 8) * trainable / (n if s >= 1 else 1)
    if s == 3 and t.precision != "bf16":
        grads = w * trainable / n  # fp32 ZeRO-3: the gradient partition is the fp32 one
    host = 0.0
    if t.offload_optimizer:
        host += fp32_grads + optimizer + (w * trainable / n if s < 3 else 0.0)
        grads, fp32_grads, optimizer = 0.0, 0.0, 0.0
    if t.offload_params:
        host += per["weights"] + trainable_weights
        per["weights"], trainable_weights = 0.0, 0.0
    per["weights"] += trainable_weights
    per.update(gradients=grads, fp32_gradients=fp32_grads, optimizer=optimizer)
    per["gathered_layer"] = float(4 * largest_layer) if s == 3 else 0.0
    per["host_offload"] = host
    return per


DEEPSPEED_BUCKET = 500_000_000
"""DeepSpeed's default bucket (elements); zero_tuning auto uses it on several ranks (workflow.finetune.config.zero_knobs)."""
ZERO3_SUB_GROUP = 1_000_000_000
"""DeepSpeed ZeRO-3 steps the optimizer one sub-group (sub_group_size elements) of the partition at a time."""


def checkpointed_layers(arch: Architecture, t: Training) -> int:
    """Decoder layers that recompute their activations: all for True, none for False (and for an unresolved auto)."""
    if t.checkpointed_layers is not None:
        return max(0, min(arch.num_layers, t.checkpointed_layers))
    return arch.num_layers if t.gradient_checkpointing is True else 0


def layer_activation_bytes(arch: Architecture, t: Training) -> float:
    """Bytes one decoder layer keeps per token for the backward pass (FlashAttention/cuDNN attention: no seq^2 term).

    With Liger's kernels a Llama/Qwen block keeps its input and the post-attention residual (2h), both norm outputs
    (2h), the rotated Q, K and V and the attention output with its contiguous copy for o_proj (3q + 2kv), and the
    MLP's gate, up and product (3i). The model's own layers add the norms' fp32 copies (+4h) and SiLU's output (+i).
    Peaks measured on H200s (8B shape, 4k-32k tokens, ZeRO-2 and 3, none, some or all layers recomputed) are within
    -1 % to +4 % of the prediction (README, Fine-tuning speed on GPUs; tests/test_plan.py).
    """
    a = 2 if t.precision == "bf16" else 4
    h, q, kv, i = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size
    elements = (4 * h + 3 * q + 2 * kv + 3 * i) if t.liger_kernel else (8 * h + 3 * q + 2 * kv + 4 * i)
    return float(a * elements)


def activations(arch: Architecture, t: Training) -> dict[str, float]:
    """Bytes per process kept for the backward pass of one micro-batch, and the loss's working memory.

    A checkpointed layer keeps only its input (h per token) and is recomputed, one layer at a time, in the backward
    pass. The loss holds the logits (bf16), their fp32 copy and log-softmax, and the fp32 gradient (12 bytes per
    token and vocabulary entry in bf16); Liger's fused linear cross-entropy instead keeps the gradient of its input
    (h per token) and of the lm_head weight, computed chunk by chunk in the forward pass.
    """
    a = 2 if t.precision == "bf16" else 4
    tokens = t.micro_batch_size * t.seq_len
    per_layer = tokens * layer_activation_bytes(arch, t)
    k = checkpointed_layers(arch, t)
    layers = (arch.num_layers - k) * per_layer + k * tokens * a * arch.hidden_size + (per_layer if k else 0.0)
    if t.liger_kernel:
        loss = tokens * a * arch.hidden_size + a * arch.vocab_size * arch.hidden_size
    else:
        loss = tokens * arch.vocab_size * (2 * a + 8)
    return {"activations": float(layers), "logits": float(loss)}


def buffers(params: int, hidden: int, t: Training) -> float:
    """DeepSpeed's gradient reduction buckets (ZeRO-2/3), allocated up front: two with overlap_comm."""
    if t.zero_stage < 2:
        return 0.0
    w = 2 if t.precision == "bf16" else 4
    if t.zero_tuning == "auto" and t.method == "full":
        bucket, count = (params, 1) if t.ranks == 1 else (min(params, DEEPSPEED_BUCKET), 2)
    else:
        bucket, count = hidden * hidden, 2
    return float(w * bucket * count)


def training_memory(arch: Architecture, t: Training, cluster: Cluster) -> dict:
    """Peak bytes per process: the larger of the forward/backward phase (model states, DeepSpeed's buckets and
    gathered layers, activations, loss) and the optimizer step (model states and buckets plus the gradient copies
    DeepSpeed makes for the step: the fp32 gradient partition and, below ZeRO-3, a flat 16-bit copy of it; ZeRO-3
    converts one sub-group at a time). With gradient_checkpointing auto on GPUs, the fewest checkpointed layers that fit."""
    if t.gradient_checkpointing == "auto" and t.checkpointed_layers is None:
        t = replace(t, checkpointed_layers=auto_checkpointed_layers(arch, t, cluster))
    p = arch.params()
    trainable = p["total"] if t.method == "full" else arch.lora_params(t.lora_r, t.lora_targets)
    per = model_states(p["total"], trainable, p["largest_layer"], t)
    host_offload = per.pop("host_offload")
    w = 2 if t.precision == "bf16" else 4
    if t.zero_stage == 3 and per["fp32_gradients"]:
        # DeepSpeed's estimator leaves out ZeRO-3's 16-bit gradient partition, which stays on the GPU.
        per["gradients"] = float(w * trainable / t.ranks)
        per["fp32_gradients"] = 4.0 * min(ZERO3_SUB_GROUP, trainable / t.ranks)
    per["gradient_copy"] = float(w * trainable / t.ranks) if 1 <= t.zero_stage <= 2 and per["fp32_gradients"] else 0.0
    per["buffers"] = buffers(trainable, arch.hidden_size, t)
    per.update(activations(arch, t))
    per["overhead"] = cluster.overhead_gib * GIB
    step_only = ("fp32_gradients", "gradient_copy")
    backward_only = ("activations", "logits")
    resident = sum(v for k, v in per.items() if k not in step_only + backward_only)
    # ZeRO-2 frees its 16-bit gradient partition after each optimizer step and builds it again in the next backward
    # pass: without accumulation the forward pass, where activations peak, runs without it (measured: README).
    unbuilt = per["gradients"] if t.zero_stage == 2 and t.gradient_accumulation_steps == 1 else 0.0
    phases = {"forward_backward": resident - unbuilt + sum(per[k] for k in backward_only),
              "optimizer_step": resident + sum(per[k] for k in step_only)}
    device = max(phases.values())
    on_gpu = cluster.gpus_per_node > 0
    host = t.ranks_per_node * (host_offload + (0.0 if on_gpu else device))
    return {
        "setup": asdict(t) | {"ranks": t.ranks, "trainable_params": trainable, "checkpointed_layers": checkpointed_layers(arch, t),
                              "num_layers": arch.num_layers},
        "per_process_gib": {k: round(v / GIB, 4) for k, v in per.items()},
        "phases_gib": {k: round(v / GIB, 4) for k, v in phases.items()},
        "device_gib": round(device / GIB, 4) if on_gpu else None,
        "device_limit_gib": cluster.gpu_memory_gib if on_gpu else None,
        "host_per_node_gib": round(host / GIB, 4),
        "host_limit_gib": cluster.host_memory_gib,
        "fits": (device <= cluster.gpu_memory_gib * GIB or not on_gpu) and host <= cluster.host_memory_gib * GIB,
    }


def auto_checkpointed_layers(arch: Architecture, t: Training, cluster: Cluster) -> int:
    """gradient_checkpointing auto: the fewest decoder layers to recompute for the run to fit its GPUs (every layer
    when even that does not fit: the plan then fails and names a change). CPU ranks checkpoint nothing."""
    if cluster.gpus_per_node == 0:
        return 0

    def fits(k: int) -> bool:
        return training_memory(arch, replace(t, checkpointed_layers=k), cluster)["fits"]

    if fits(0):
        return 0
    # From one layer on, each further checkpointed layer saves memory: bisect for the fewest that fit.
    low, high = 1, arch.num_layers
    if not fits(high):
        return high
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low


def training_suggestion(arch: Architecture, t: Training, cluster: Cluster) -> dict | None:
    """The cheapest change that fits: gradient checkpointing, then a higher ZeRO stage, a smaller micro-batch,
    offload, and only then more nodes (costs are rough ranks of slowdown and hardware)."""
    best = None
    halvings = [t.micro_batch_size >> k for k in range(8) if t.micro_batch_size >> k >= 1]
    node_counts = [t.nodes * 2**k for k in range(7)]
    # auto checkpoints the fewest layers that fit, so it is the only change of checkpointing worth naming.
    checkpointing = (False, "auto") if t.gradient_checkpointing is False else (t.gradient_checkpointing,)
    for stage, gc, mb, off_opt, off_par, nodes in itertools.product(
        range(t.zero_stage, 4), checkpointing, halvings, (t.offload_optimizer, True), (t.offload_params, True), node_counts
    ):
        c = replace(t, zero_stage=stage, gradient_checkpointing=gc, micro_batch_size=mb, offload_optimizer=off_opt, offload_params=off_par, nodes=nodes)
        if not c.valid() or c == t:
            continue
        cost = (stage - t.zero_stage) + 2 * (gc != t.gradient_checkpointing) + 2 * halvings.index(mb) + 3 * (off_opt != t.offload_optimizer) \
            + 4 * (off_par != t.offload_params) + 6 * node_counts.index(nodes)
        if best is not None and cost >= best[0]:
            continue
        if training_memory(arch, c, on_nodes(cluster, nodes))["fits"]:
            best = (cost, c)
    if best is None:
        return None
    c = best[1]
    changes = {f"finetune.{k}": getattr(c, k) for k in ("zero_stage", "gradient_checkpointing", "micro_batch_size", "offload_optimizer", "offload_params")
               if getattr(c, k) != getattr(t, k)}
    if c.nodes != t.nodes:
        changes["cluster.nodes"] = c.nodes
    return {"changes": changes, "memory": training_memory(arch, c, on_nodes(cluster, c.nodes))}


@dataclass(frozen=True)
class Serving:
    scheme: str
    tp: int = 1
    pp: int = 1
    max_batch: int = 1
    max_seq_len: int = 2048
    on_gpu: bool = True
    fp32_baseline: bool = False
    """ONNX Runtime on CPU builds the unquantized baseline in fp32 (4 bytes), not bf16."""

    @property
    def linear_bytes(self) -> float:
        return 4.0 if self.fp32_baseline and SCHEMES[self.scheme].baseline else SCHEMES[self.scheme].weight_bytes

    @property
    def other_bytes(self) -> float:
        return 4.0 if self.fp32_baseline else 2.0


def serving_memory(arch: Architecture, s: Serving, cluster: Cluster) -> dict:
    """Bytes per GPU: the scheme's weights split over tp x pp (embedding on the first pipeline stage, lm_head on
    the last, each split by tp) and the KV cache (layers split by pp, KV heads by tp, replicated when tp > heads)."""
    p = arch.params()
    linear = p["linear"] * s.linear_bytes / (s.tp * s.pp)
    other = s.other_bytes * (p["total"] - p["linear"] - p["embed"] - p["lm_head"]) / (s.tp * s.pp)
    ends = s.other_bytes * (max(p["embed"], p["lm_head"]) if s.pp > 1 else p["embed"] + p["lm_head"]) / s.tp
    kv_heads = max(1, arch.num_kv_heads // s.tp)
    kv = s.max_batch * s.max_seq_len * math.ceil(arch.num_layers / s.pp) * 2 * kv_heads * arch.head_dim * KV_BYTES
    per = {"weights": linear + other + ends, "kv_cache": float(kv), "overhead": cluster.overhead_gib * GIB}
    total = sum(per.values())
    limit = cluster.gpu_memory_gib if s.on_gpu else cluster.host_memory_gib
    gpus = cluster.gpus_per_node * cluster.nodes
    return {
        "setup": asdict(s),
        "weights_total_gib": round((p["linear"] * s.linear_bytes + s.other_bytes * (p["total"] - p["linear"])) / GIB, 4),
        "per_device_gib": {k: round(v / GIB, 4) for k, v in per.items()},
        "device_gib": round(total / GIB, 4),
        "device_limit_gib": limit,
        "fits": total <= limit * GIB and (not s.on_gpu or s.tp * s.pp <= gpus) and arch.num_heads % s.tp == 0,
    }


def serving_suggestion(arch: Architecture, s: Serving, cluster: Cluster) -> dict | None:
    """A change that makes serving fit. On GPUs: the fewest GPUs (tp within a node first, then pp across nodes).
    On the CPU: fewer concurrent requests when the KV cache is what overflows, else the host memory it needs or a GPU
    engine (a smaller batch cannot shrink the weights)."""
    if not s.on_gpu:
        for b in (s.max_batch >> k for k in range(1, 12) if s.max_batch >> k >= 1):
            smaller = serving_memory(arch, replace(s, max_batch=b), cluster)
            if smaller["fits"]:
                return {"changes": {"benchmark.concurrency": f"at most {b}"}, "memory": smaller}
        need = math.ceil(serving_memory(arch, s, cluster)["device_gib"])
        changes = {"cluster.host_memory_gib": need}
        if cluster.gpus_per_node:
            changes["or engine.backend"] = "tensorrt_llm"
        return {"changes": changes, "memory": serving_memory(arch, s, cluster.model_copy(update={"host_memory_gib": need}))}
    options = sorted((tp * pp, pp, tp) for tp in (1, 2, 4, 8, 16) for pp in (1, 2, 4, 8, 16)
                      if tp <= max(cluster.gpus_per_node, 1) and arch.num_heads % tp == 0 and pp <= arch.num_layers)
    for _, pp, tp in options:
        c = replace(s, tp=tp, pp=pp)
        if (tp, pp) != (s.tp, s.pp) and serving_memory(arch, c, on_nodes(cluster, max(cluster.nodes, math.ceil(tp * pp / max(cluster.gpus_per_node, 1)))))["fits"]:
            return {"changes": {"engine.tensorrt_llm.tp_size": tp, "engine.tensorrt_llm.pp_size": pp},
                    "gpus": tp * pp, "memory": serving_memory(arch, c, on_nodes(cluster, math.ceil(tp * pp / max(cluster.gpus_per_node, 1))))}
    return None


def generation_memory(arch: Architecture, batch: int, cache_len: int, prompt_len: int, dtype_bytes: int, cluster: Cluster) -> dict:
    """Bytes on one GPU while a job generates `batch` sequences at once (workflow.generation): the weights in their
    dtype, a static KV cache of `cache_len` positions per sequence, and the largest transient, the prefill of
    `prompt_len` tokens per sequence through one decoder layer (hidden states, q/k/v, the MLP's gate, up and product,
    the padded attention mask) and the last position's fp32 logits."""
    p = arch.params()
    weights = p["total"] * dtype_bytes
    kv = batch * cache_len * arch.num_layers * 2 * arch.kv_dim * dtype_bytes
    tokens = batch * prompt_len
    prefill = tokens * (4 * arch.hidden_size + arch.q_dim + 2 * arch.kv_dim + 3 * arch.intermediate_size) * dtype_bytes
    mask = batch * prompt_len * cache_len
    logits = batch * arch.vocab_size * 4 * 2
    per = {"weights": float(weights), "kv_cache": float(kv), "prefill": float(prefill + mask + logits),
           "overhead": cluster.overhead_gib * GIB}
    total = sum(per.values())
    return {"batch": batch, "cache_len": cache_len, "per_device_gib": {k: round(v / GIB, 4) for k, v in per.items()},
            "device_gib": round(total / GIB, 4), "device_limit_gib": cluster.gpu_memory_gib, "fits": total <= cluster.gpu_memory_gib * GIB}


def model_architecture(model_dir: str | None, bootstrap: BootstrapConfig) -> tuple[Architecture, str]:
    """The base model's architecture: its config.json, or the bootstrap settings (built later by the DAG)."""
    if model_dir is None:
        config = {"vocab_size": bootstrap.vocab_size, "hidden_size": bootstrap.hidden_size, "num_hidden_layers": bootstrap.num_layers,
                  "num_attention_heads": bootstrap.num_heads, "num_key_value_heads": bootstrap.num_kv_heads,
                  "intermediate_size": bootstrap.intermediate_size, "model_type": "llama",
                  "max_position_embeddings": bootstrap.max_position_embeddings}
        return Architecture.from_hf_config(config, "bootstrap settings"), "the bootstrap settings; vocab_size as an upper bound"
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise PlanError(f"plan: {path} not found; base_model must be a Hugging Face checkpoint folder with a config.json")
    return Architecture.from_hf_config(json.loads(path.read_text()), str(path)), str(path)
