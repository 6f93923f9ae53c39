"""The quantization schemes: one row each, read by the config, the rules, quantize, the planner, the engines and the
tests. Everything about a scheme lives in its row; nothing else names a scheme.

Adding a scheme is a row here and its entry in config/config.yaml (then `make schema`): docs/architecture.md,
"How to add a quantization scheme".
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    modelopt: str | None
    """The ModelOpt config the quantize stage applies (None: the unquantized baseline, exactly one scheme)."""
    block: int
    """Block size the kernels need along every projection's in-features."""
    weight_bytes: float
    """Bytes per linear-layer weight once quantized (the planner's memory model), scales included."""
    max_accuracy_loss: float
    """Default accuracy drop allowed vs the fine-tuned model (absolute; the source document's figures)."""
    max_kl: float
    """Default largest mean KL(fine-tuned || candidate) per answer token (docs/quantization-and-engines.md, "Closeness")."""
    min_agreement: float
    """Default least teacher-forced next-token agreement with the fine-tuned model."""
    tensorrt_llm_min_compute: tuple[int, int]
    """The oldest CUDA compute capability TensorRT-LLM has kernels for it on."""
    calibration: str | None = None
    """The per-input-channel scales its ModelOpt recipe calibrates (AWQ, SmoothQuant), which engines that quantize
    weights themselves (ONNX Runtime GenAI) get folded into the weights (workflow/engine/calibration.py)."""
    quant_algo: str | None = None
    """The quant_algo ModelOpt's export writes to hf_quant_config.json for it, which TensorRT-LLM reads (None: none written)."""
    onnxruntime: dict[str, str] = field(default_factory=dict)
    """The ONNX Runtime GenAI model builder's precision (`-p`) for it, per execution provider; a provider missing
    here has no kernels for the scheme, and the scheme gets no engine there."""

    fallback_blocks: tuple[int, ...] = ()
    """Smaller block sizes its recipe also takes, tried in order when the model's in-features do not divide by
    block (ModelOpt AWQ quantizes in groups of 64 too, which TensorRT-LLM's int4 kernels take: 64 divides 576)."""

    @property
    def baseline(self) -> bool:
        """The unquantized baseline: no ModelOpt recipe, 16-bit weights."""
        return self.modelopt is None

    def block_for(self, in_features: list[int]) -> int | None:
        """The block size this model's in-features take (the first that divides them all), or None."""
        return next((b for b in (self.block, *self.fallback_blocks) if all(n % b == 0 for n in in_features)), None)


SCHEMES = {
    scheme.name: scheme
    for scheme in (
        Scheme("bf16", "bf16 weights and activations: the unquantized baseline", None, 1, 2.0, 0.005, 0.005, 0.98, (8, 0),
               onnxruntime={"cpu": "fp32", "cuda": "bf16"}),  # no fast bf16 kernels on CPU: fp32
        Scheme("fp8", "FP8 E4M3 weights and activations, per-tensor scales", "FP8_DEFAULT_CFG", 16, 1.0, 0.008, 0.05, 0.93, (8, 9),
               quant_algo="FP8"),
        Scheme("int8_sq", "INT8 weights (per channel) and activations, SmoothQuant", "INT8_SMOOTHQUANT_CFG", 1, 1.0, 0.012, 0.05, 0.95, (8, 0),
               "SmoothQuant", quant_algo="W8A8_SQ_PER_CHANNEL", onnxruntime={"cpu": "int8", "cuda": "int8"}),
        Scheme("int4_awq", "INT4 weights in blocks of 128 (64 where 128 does not divide), AWQ-scaled; 16-bit activations",
               "INT4_AWQ_CFG", 128, 0.5 + 2 / 128, 0.03, 0.25, 0.9, (8, 0), "AWQ", quant_algo="W4A16_AWQ",
               onnxruntime={"cpu": "int4", "cuda": "int4"}, fallback_blocks=(64,)),
    )
}

(BASELINE,) = [name for name, scheme in SCHEMES.items() if scheme.baseline]
"""The unquantized scheme every quantized one is measured against (serving memory, engine manifests)."""

WILDCARD = "|".join(SCHEMES)
"""The rules' wildcard constraint for {scheme}."""


def buildable(scheme: str, backend: str, execution_provider: str) -> bool:
    """Whether the engine backend can build the scheme (ONNX Runtime GenAI only where its row names a precision; PyTorch
    the unquantized baseline only)."""
    if backend == "pytorch":
        return SCHEMES[scheme].baseline
    return backend != "onnxruntime" or execution_provider in SCHEMES[scheme].onnxruntime
