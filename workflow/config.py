"""The workflow's settings, declared once: type, allowed values, default and description of every config key.

config/schema.yaml is generated from these models (`make schema`, i.e. `python -m workflow.config`); the stages
take their section as the typed model declared here. Errors name the key, what was found and what is allowed.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    create_model,
    model_validator,
)

from workflow.roles import ROLES
from workflow.schemes import SCHEMES

SCHEMA = Path(__file__).parent.parent / "config" / "schema.yaml"

SchemeName = Literal[tuple(SCHEMES)]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """The config does not match the declared settings."""


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Cluster(Section):
    """The machines the plan rule checks training and serving memory against before anything runs. Accounts,
    partitions and queue settings stay in profiles/."""

    gpus_per_node: Annotated[int, Field(ge=0)] = 0
    """GPUs per node; 0 is a CPU machine, where every rank's memory counts against host memory."""
    gpu_memory_gib: Annotated[float, Field(gt=0)] = 80
    """Memory per GPU in GiB."""
    nodes: Annotated[int, Field(ge=1)] = 1
    """Nodes the finetune job spans; it requests gpus_per_node x nodes GPUs and launches one launcher per node."""
    host_memory_gib: Annotated[float, Field(gt=0)] = 16
    """Host memory per node in GiB (CPU ranks, ZeRO offload, CPU engines)."""
    overhead_gib: Annotated[float, Field(ge=0)] = 1.0
    """Memory per process beyond the model: CUDA context, NCCL buffers, allocator fragmentation (the Python process on CPU)."""


class BootstrapConfig(Section):
    """Shape and pretraining of the locally built base model; used only when base_model is "bootstrap"."""

    hidden_size: Annotated[int, Field(ge=128, multiple_of=128)] = 128
    """Model width (a multiple of 128 so INT4-AWQ can quantize every projection)."""
    intermediate_size: Annotated[int, Field(ge=128, multiple_of=128)] = 256
    """MLP width (a multiple of 128: it is the in-features of down_proj)."""
    num_layers: Annotated[int, Field(ge=1)] = 2
    """Transformer blocks."""
    num_heads: Annotated[int, Field(ge=1)] = 4
    """Attention heads (hidden_size must divide by it)."""
    num_kv_heads: Annotated[int, Field(ge=1)] = 2
    """Key/value heads (grouped-query attention; num_heads must divide by it)."""
    vocab_size: Annotated[int, Field(ge=300)] = 1024
    """Target size of the BPE vocabulary (the trainer may stop below it)."""
    max_position_embeddings: Annotated[int, Field(ge=64)] = 1024
    """Longest sequence the model is built for."""
    pretrain_rows: Annotated[int, Field(ge=100)] = 6000
    """Prose arithmetic problems to pretrain on (a seed apart from the fine-tuning data)."""
    pretrain_steps: Annotated[int, Field(ge=1)] = 800
    """Pretraining optimizer steps."""
    batch_size: Annotated[int, Field(ge=1)] = 32
    """Pretraining batch size."""
    learning_rate: Annotated[float, Field(gt=0)] = 0.003
    """Pretraining peak learning rate."""
    seed: Annotated[int, Field(ge=0)] = 1234
    """Seed of the base model (kept apart from the fine-tuning seed)."""

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) "
                             f"and num_heads by num_kv_heads ({self.num_kv_heads})")
        return self


class DataConfig(Section):
    """The fine-tuning dataset and how it is checked and split."""

    path: str = "generated"
    """JSONL file of training rows (OpenAI chat form with "messages", ShareGPT form with "conversations" of
    "from"/"value", or alpaca form with "instruction"/"input"/"output"; reasoning as an assistant turn's
    "reasoning_content" or inline in <think>...</think>), or "generated" for the built-in arithmetic reasoning dataset."""
    generated_rows: Annotated[int, Field(ge=10)] = 3000
    """Rows the built-in generator makes when path is "generated"."""
    on_bad_row: Literal["fail", "skip"] = "fail"
    """A row that fails validation stops the stage naming file and line (fail), or is dropped and counted (skip)."""
    val_fraction: Annotated[float, Field(ge=0, le=0.5)] = 0.05
    """Share of rows held out for validation loss."""
    test_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.07
    """Share of rows held out for evaluation."""
    max_seq_len: Annotated[int, Field(ge=16)] = 256
    """Rows longer than this many tokens after rendering are dropped and counted."""
    chat_template: str = "auto"
    """How training text is rendered. auto: with the model's own chat template where it renders each trained
    turn's reasoning in place, or writes it inline (templates that know no reasoning); for templates that drop
    reasoning by design (DeepSeek-R1 and its distills) the prompt is the model's own generation prompt and the
    target is reasoning, </think>, the answer and the end token. model: the model's template only (fails on
    templates that drop reasoning). Or the path of a .jinja training template, whose prompts must equal the model's own."""
    reasoning_turns: Literal["last", "all"] = "last"
    """last: one example per conversation; earlier assistant turns appear as the model's template renders them in
    history (R1 and Qwen3 strip their reasoning) and are trained only where that is what the model generates.
    all: one example per assistant turn, each trained with its reasoning in the context the model is served."""


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

OPTIMIZERS = {"adamw_fused": "adamw_torch_fused", "adamw_foreach": "adamw_torch"}
"""The optimizer setting and the Transformers optimizer name it stands for."""


class LoraSettings(Section):
    """LoRA adapter settings (method lora only)."""

    r: Annotated[int, Field(ge=1)] = 16
    """Adapter rank."""
    alpha: Annotated[int, Field(ge=1)] = 32
    """Adapter scaling numerator (the adapter output is scaled by alpha / r)."""
    dropout: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Dropout on the adapter input."""
    target_modules: Annotated[tuple[str, ...], Field(min_length=1)] = LORA_MODULES
    """Module names that get adapters."""


class FinetuneConfig(Section):
    """Fine-tuning with DeepSpeed through the Transformers Trainer."""

    method: Literal["full", "lora"] = "full"
    """full trains every parameter; lora trains a PEFT LoRA adapter and merges it on export."""
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    """The distributed launcher that starts one process per device."""
    nproc_per_node: Annotated[int, Field(ge=1)] = 2
    """Processes per node (one per GPU; on a CPU host, CPU ranks over gloo)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload_optimizer: StrictBool = False
    """Keep optimizer states in CPU memory (ZeRO 1-3)."""
    offload_params: StrictBool = False
    """Keep parameters in CPU memory (ZeRO 3 only)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision (bf16 mixed precision needs hardware support; fp32 on CPU)."""
    epochs: Annotated[float, Field(gt=0)] = 3
    """Passes over the training split."""
    max_steps: Annotated[int, Field(ge=-1)] = -1
    """Stop after this many optimizer steps (-1 runs the epochs)."""
    micro_batch_size: Annotated[int, Field(ge=1)] = 16
    """Rows per process per step."""
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    """Micro-batches accumulated per optimizer step."""
    micro_batch_fill: Literal["auto", "off"] = "auto"
    """auto: on GPUs, fewer and larger micro-batches with the same rows per optimizer step (micro_batch_size x
    gradient_accumulation_steps), the largest the planner's memory model fits without recomputing more layers
    (each micro-batch costs ZeRO-2/3 a gradient reduction, and ZeRO-3 two parameter gathers); recorded in MLflow
    as resolved.micro_batch_size and resolved.gradient_accumulation_steps. Unchanged on CPU ranks. off: as configured."""
    learning_rate: Annotated[float, Field(gt=0)] = 0.001
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.05
    """Share of steps spent warming up."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """AdamW weight decay."""
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    """Gradient clipping norm."""
    gradient_checkpointing: Literal["auto", True, False] = "auto"
    """Recompute activations in the backward pass to save memory. auto: on GPUs the fewest decoder layers that
    make the run fit, chosen on the GPU that trains by the planner's memory model (none when everything fits; none
    on CPU ranks), recorded in MLflow as resolved.checkpointed_layers; true: every layer; false: none."""
    packing: StrictBool = True
    """Pack each micro-batch into one padding-free row with per-sequence position ids; attention is
    block-diagonal, so sequences never see each other."""
    attention: Literal["auto", "varlen", "sdpa", "flex_attention", "eager"] = "auto"
    """Attention kernel. auto is varlen on a CUDA GPU when packing is on (FlashAttention over the packed sequence
    boundaries, torch.nn.attention.varlen; micro-batches whose rows share one length run batched SDPA instead)
    and sdpa otherwise; varlen needs packing and a CUDA GPU."""
    liger_kernel: StrictBool = True
    """Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) through the Transformers
    Trainer; CUDA GPUs only (needs the liger-kernel package, requirements-gpu.txt), skipped on CPU with a log line."""
    optimizer: Literal[tuple(OPTIMIZERS)] = "adamw_fused"  # type: ignore[valid-type]
    """AdamW as torch's fused kernel or its multi-tensor (foreach) form. offload_optimizer uses DeepSpeed's CPU Adam instead."""
    torch_compile: StrictBool = False
    """torch.compile each decoder layer's forward (one compiled code shared by the layers), on any device. Liger
    then keeps only its fused linear cross-entropy; ZeRO-3 runs eagerly (it recompiles every layer). Off by
    default: measured no faster than the Liger kernels on an H200 (docs/finetuning.md)."""
    dataloader_workers: Annotated[int, Field(ge=0)] = 2
    """Processes that collate batches beside each rank, with pinned memory (CUDA GPUs; 0 on CPU, where the ranks use every core)."""
    zero_tuning: Literal["auto", "stock"] = "auto"
    """auto sizes the ZeRO-2/3 buckets from the model and the number of ranks (one bucket and no side stream on a
    single rank, DeepSpeed's 500M-element buckets, at most the model, on several) and keeps ZeRO-3 parameters
    whole on each rank when there is one rank or their 16-bit copy takes at most 1/16 of a GPU, gathering each
    decoder layer's parameters as one unit (DeepSpeed leaf modules; full fine-tunes, LoRA keeps stock); with bf16
    it also turns off DeepSpeed's per-tensor gradient overflow scan (a non-finite loss stops the run instead).
    stock leaves all of it to the Trainer and DeepSpeed (buckets of hidden_size^2 elements)."""
    save_steps: Annotated[int, Field(ge=1)] = 40
    """Write a resumable checkpoint every this many steps."""
    save_total_limit: Annotated[int, Field(ge=1)] = 2
    """Resumable checkpoints kept."""
    logging_steps: Annotated[int, Field(ge=1)] = 10
    """Log loss, learning rate and throughput every this many steps."""
    lora: LoraSettings = LoraSettings()
    """LoRA adapter settings (method lora only)."""

    @model_validator(mode="after")
    def _combinations(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got zero_stage {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (got 0)")
        if self.attention == "varlen" and not self.packing:
            raise ValueError("attention varlen needs packing: true (it reads the packed sequence boundaries); use auto or sdpa")
        return self

    @property
    def tunes_zero(self) -> bool:
        """Whether zero_tuning: auto applies: full fine-tunes only (LoRA's few trainable weights keep stock values)."""
        return self.zero_tuning == "auto" and self.method == "full"


class Gate(Section):
    """The fine-tuned model must pass both thresholds on evaluate.metric or the DAG stops."""

    min_accuracy: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Minimum score of the fine-tuned model on evaluate.metric (accuracy, the scorer's mean, or the lm_eval metric)."""
    min_gain: Annotated[float, Field(ge=-1, le=1)] = 0.3
    """Minimum gain over the base model on the same metric."""


class LmEvalTask(Section):
    """An lm-evaluation-harness task run offline against each model (evaluate.metric: lm_eval)."""

    include_path: str | None = None
    """Folder of task YAML files (lm-eval's --include_path). Their datasets must be local files (dataset_path: json
    with dataset_kwargs.data_files); the harness runs with HF_HUB_OFFLINE and HF_DATASETS_OFFLINE set."""
    task: str | None = None
    """Name of the task (its `task:` key) in include_path."""
    metric: str = "exact_match"
    """The task's metric the gate reads (a metric of its metric_list, e.g. exact_match or acc)."""
    filter: str = "none"
    """The task's filter whose result is read (lm-eval reports `metric,filter`; none when the task has no filter_list)."""
    num_fewshot: Annotated[int, Field(ge=0)] | None = None
    """Few-shot examples per prompt; null keeps the task's own setting."""
    apply_chat_template: StrictBool = True
    """Render prompts with the model's chat template (the way the model is served)."""


class EvalConfig(Section):
    """Evaluation of the base, fine-tuned and quantized models and the engines, and the quality gate."""

    path: str | None = None
    """JSONL file of evaluation rows (any form data.path accepts) used as the test split instead of the random
    data.test_fraction share of data.path (which then goes to training); rows also in data.path are kept out of
    training. null: the random split."""
    metric: Literal["exact", "contains", "regex", "scorer", "lm_eval"] = "exact"
    """How an answer (the text after </think>, or the whole text when the model does not think) is scored against the
    reference answer. exact: equal after normalisation (case, whitespace, trailing punctuation, numbers written 1,000
    or 1000.0); contains: the reference appears in the answer as whole words; regex: evaluate.pattern's first capture
    group equals the reference's (or the whole reference), normalised; scorer: the user's function (evaluate.scorer);
    lm_eval: an lm-evaluation-harness task (evaluate.lm_eval) instead of the test split's answers."""
    pattern: str | None = None
    """Regular expression with a capture group (metric regex), e.g. 'answer is (-?[0-9.,]+)'."""
    scorer: str | None = None
    """The user's scorer as module:function (metric scorer), called as function(answer, reference) and returning a
    bool or a number in [0, 1]; the gate reads the mean."""
    scorer_path: str = "."
    """Folder the scorer's module is imported from (put first on the import path)."""
    lm_eval: LmEvalTask = LmEvalTask()
    """An lm-evaluation-harness task run offline against each model (metric lm_eval)."""
    max_samples: Annotated[int, Field(ge=1)] = 200
    """Test rows evaluated (the first N of the test split; the first N documents of an lm_eval task)."""
    max_new_tokens: Annotated[int, Field(ge=1)] = 96
    """Generation budget per answer (greedy)."""
    batch_size: Annotated[int, Field(ge=1)] = 32
    """Prompts generated together."""
    sample_generations: Annotated[int, Field(ge=0)] = 12
    """Rows shown in the sample-generation table."""
    gate: Gate = Gate()
    """The fine-tuned model must pass both thresholds on evaluate.metric or the DAG stops."""

    @model_validator(mode="after")
    def _metric_settings(self):
        from workflow.metrics import compile_pattern, load_scorer

        if self.metric == "regex":
            compile_pattern(self.pattern)
        elif self.metric == "scorer":
            load_scorer(self.scorer, self.scorer_path)
        elif self.metric == "lm_eval":
            from workflow.harness import check_task

            check_task(self.lm_eval)
        return self


def per_scheme(model: str, doc: str, what: str, default: str, **bounds) -> type[Section]:
    """A section with one float threshold per scheme, its default read from the scheme table's field `default`."""
    return create_model(
        model, __base__=Section, __doc__=doc,
        **{name: (Annotated[float, Field(**bounds, description=f"{what} for {name}: {s.description}.")], getattr(s, default))
           for name, s in SCHEMES.items()},
    )


AccuracyLoss = per_scheme(
    "AccuracyLoss", "Largest accepted drop in exact-match accuracy (absolute, vs the fine-tuned model) per scheme; a scheme "
    "over it is dropped with its reason. Defaults follow the source document (INT8 1.2 %, FP8 0.8 %).",
    "Allowed loss", "max_accuracy_loss", ge=0)
MaxKl = per_scheme(
    "MaxKl", "Largest accepted mean KL divergence (fine-tuned || candidate, nats per reference answer token) per scheme, "
    "for the quantized model and its engine; a scheme over it is dropped with its reason (workflow/closeness.py).",
    "Allowed mean KL", "max_kl", ge=0)
MinAgreement = per_scheme(
    "MinAgreement", "Least accepted teacher-forced next-token agreement with the fine-tuned model (share of reference "
    "answer tokens where both predict the same next token) per scheme, for the quantized model and its engine.",
    "Least agreement", "min_agreement", ge=0, le=1)


class QuantizeConfig(Section):
    """Post-training quantization with NVIDIA ModelOpt and its accuracy gate."""

    schemes: Annotated[tuple[SchemeName, ...], Field(min_length=1)] = tuple(SCHEMES)
    """Schemes to quantize, evaluate, build and benchmark (workflow/schemes.py; bf16 is the unquantized baseline)."""
    calib_samples: Annotated[int, Field(ge=1)] = 64
    """Training rows used to calibrate scales (recorded with their digest)."""
    max_accuracy_loss: AccuracyLoss = AccuracyLoss()
    """Largest accepted drop in exact-match accuracy (absolute, vs the fine-tuned model) per scheme; a scheme over
    it is dropped with its reason. Defaults follow the source document (INT8 1.2 %, FP8 0.8 %)."""
    max_kl: MaxKl = MaxKl()
    """Largest accepted mean KL(fine-tuned || candidate) per reference answer token, per scheme, for the quantized model
    and its engine (teacher-forced on the test split). Defaults: docs/quantization-and-engines.md, "Closeness"."""
    min_agreement: MinAgreement = MinAgreement()
    """Least accepted teacher-forced next-token agreement with the fine-tuned model, per scheme, for the quantized model
    and its engine."""
    closeness_rows: Annotated[int, Field(ge=1)] = 64
    """Test rows (the first ones) whose reference answers the closeness figures are measured on."""

    @model_validator(mode="after")
    def _unique(self):
        if len(set(self.schemes)) != len(self.schemes):
            raise ValueError(f"schemes lists a scheme twice: {list(self.schemes)}")
        return self


class OnnxRuntimeSettings(Section):
    """ONNX Runtime GenAI model builder settings."""

    execution_provider: Literal["cpu", "cuda"] = "cpu"
    """Where the engine runs."""
    block_size: Literal[16, 32, 64, 128, 256] = 32
    """Block size of int4/int8 weight quantization."""
    accuracy_level: Literal[1, 2, 3, 4] = 4
    """Compute type of quantized MatMuls (4: int8, 1: fp32)."""
    calibration: Literal["auto", "calibrated", "rtn"] = "auto"
    """Weights the int8/int4 engines quantize: calibrated (the quantize stage's AWQ or SmoothQuant scales folded into the fine-tuned weights, then block-quantized), rtn (round-to-nearest of the fine-tuned weights), or auto (build both, measure both engines' accuracy on the test split, keep the better; a tie keeps calibrated)."""
    max_batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    """Requests an engine on CPU decodes together; a new request joins the running batch at the next step (continuous batching)."""


class PytorchSettings(Section):
    """PyTorch engine settings (the baseline checkpoint served by Transformers on a GPU, workflow/engine/pytorch.py)."""

    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    """Requests generated together; a request that arrives while a batch runs waits for the next batch."""


class TrtllmSettings(Section):
    """TensorRT-LLM engine settings (built inside its release container on tp_size x pp_size GPUs)."""

    tp_size: Annotated[int, Field(ge=1)] = 1
    """Tensor-parallel degree."""
    pp_size: Annotated[int, Field(ge=1)] = 1
    """Pipeline-parallel degree."""
    max_batch_size: Annotated[int, Field(ge=1)] = 64
    """Largest batch the engine schedules (in-flight batching)."""
    max_input_len: Annotated[int, Field(ge=1)] = 1024
    """Longest prompt."""
    max_seq_len: Annotated[int, Field(ge=2)] = 2048
    """Longest prompt plus output."""


class EngineConfig(Section):
    """Inference engine building."""

    backend: Literal["onnxruntime", "tensorrt_llm", "pytorch"] = "onnxruntime"
    """onnxruntime (ONNX Runtime GenAI, the embedded CPU default), tensorrt_llm (GPU clusters, release container) or pytorch (the unquantized baseline served by Transformers on a GPU, where neither of the others runs)."""
    onnxruntime: OnnxRuntimeSettings = OnnxRuntimeSettings()
    """ONNX Runtime GenAI model builder settings."""
    pytorch: PytorchSettings = PytorchSettings()
    """PyTorch engine settings."""
    tensorrt_llm: TrtllmSettings = TrtllmSettings()
    """TensorRT-LLM engine settings (built inside its release container on tp_size x pp_size GPUs)."""


class LoadConfig(Section):
    """Continuous-load benchmark of each engine."""

    input_len: Annotated[int, Field(ge=1)] = 512
    """Prompt tokens per request."""
    output_len: Annotated[int, Field(ge=1)] = 128
    """Output tokens per request (generation is held to exactly this)."""
    concurrency: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1)] = (1, 4)
    """Concurrency levels, ascending; the last one is used for selection."""
    requests: Annotated[int, Field(ge=1)] = 16
    """Requests per concurrency level."""
    repeats: Annotated[int, Field(ge=1)] = 3
    """Runs of each level: the reported throughput is their median, and their spread (max - min) is the noise within which select counts throughputs as a tie (the smaller engine wins)."""


class SelectConfig(Section):
    """How the production scheme is chosen."""

    policy: Literal["max_throughput", "max_accuracy"] = "max_throughput"
    """Which eligible scheme wins."""
    latency_slo_p95_s: Annotated[float, Field(gt=0)] = 30
    """Largest accepted p95 request latency (s) at the highest concurrency."""
    tie_break: Literal["smallest", "closest"] = "smallest"
    """Which of the schemes whose throughputs tie within the benchmark's measured spread wins under max_throughput:
    the smallest engine, or the engine closest to the fine-tuned model (lowest mean KL; the unquantized engine
    wins every tie it is in)."""


class LocalKms(Section):
    """Local key file settings."""

    key_file: str = "keys/kek.bin"
    """32-byte key file, created 0600; looser permissions are refused."""


class Pkcs11Kms(Section):
    """PKCS#11 HSM settings (the PIN comes from the environment, never from config)."""

    module: str = "/usr/lib/softhsm/libsofthsm2.so"
    """The HSM's PKCS#11 library."""
    token_label: str = "ft2prod"
    """Token label."""
    key_label: str = "kek"
    """Label of the AES key in the token."""
    pin_env: str = "PKCS11_PIN"
    """Environment variable holding the user PIN."""


class VaultKms(Section):
    """HashiCorp Vault Transit settings (token from VAULT_TOKEN)."""

    url: str = "https://vault.internal:8200"
    """Vault address."""
    key_name: str = "ft2prod"
    """Transit key name."""
    mount_point: str = "transit"
    """Transit engine mount point."""


class Kms(Section):
    """Which KMS holds the key-encryption key."""

    provider: Literal["local", "pkcs11", "vault"] = "local"
    """local key file, PKCS#11 HSM, or HashiCorp Vault Transit."""
    local: LocalKms = LocalKms()
    """Local key file settings."""
    pkcs11: Pkcs11Kms = Pkcs11Kms()
    """PKCS#11 HSM settings (the PIN comes from the environment, never from config)."""
    vault: VaultKms = VaultKms()
    """HashiCorp Vault Transit settings (token from VAULT_TOKEN)."""


class PackageConfig(Section):
    """Encrypted, signed packaging of the selected engine, registration and backup."""

    model_name: str = "ft2prod-model"
    """Name of the registered model in MLflow."""
    signing_key: str = "keys/signing.pem"
    """Ed25519 private key (PEM, owner-only); made on first use."""
    chunk_mb: Annotated[int, Field(ge=1, le=256)] = 4
    """Plaintext per AES-256-GCM chunk, MiB."""
    backup_dir: str = "backups"
    """Where the backup rule copies and verifies packages."""
    log_max_mb: Annotated[float, Field(ge=0)] = 200
    """Packages up to this size are copied into MLflow (ciphertext); larger ones by reference."""
    trusted_signer: str | None = None
    """Signer public key (PEM) that gateways accept packages from; null takes the public half written beside signing_key
    (keys/signing.pub): gateways never read the private key."""
    kms: Kms = Kms()
    """Which KMS holds the key-encryption key."""


class Tls(Section):
    """Server certificate; a local CA and certificate are made when missing."""

    dir: str = "keys/tls"
    """Folder with server.pem, server.key and ca.pem."""
    hosts: Annotated[tuple[str, ...], Field(min_length=1)] = ("localhost", "127.0.0.1")
    """Names the made certificate is valid for."""


LOOPBACK = ("127.0.0.0/8",)


Allow = create_model(
    "Allow",
    __base__=Section,
    __doc__="Client address allow-list (CIDRs) per role.",
    **{name: (tuple[str, ...], Field(LOOPBACK, description=f"CIDRs {name}s may call from."))  # type: ignore[call-overload]
       for name in ROLES},
)


MAX_BODY_BYTES = 16 << 20
"""The largest body limit an admin may set: a 1M-token prompt is about 4 MiB of text, so 16 MiB holds any real request."""
MAX_TOKENS = 1 << 20
"""The largest token limit an admin may set: the longest context windows models have (1M tokens)."""


class Limits(Section):
    """Request limits (admins adjust them at run time, within these bounds)."""

    max_body_bytes: Annotated[int, Field(ge=1024, le=MAX_BODY_BYTES)] = 65536
    """Largest request body (413 above); 1 KiB to 16 MiB (at least 1 KiB, so that an admin's request to raise it again still fits)."""
    max_prompt_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = 1024
    """Longest prompt in tokens (400 above); 1 to 1,048,576."""
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = 256
    """Most tokens a request may generate, and the default when it asks for none (400 above); 1 to 1,048,576."""


class Audit(Section):
    """The audit log, chained with a key kept apart from it."""

    path: str = "audit/gateway.jsonl"
    """Audit log file (JSON lines)."""
    key_file: str = "keys/audit.key"
    """HMAC-SHA256 key of the chain (32 bytes, owner-only, made on first use). Keep it off the audit volume: whoever
    can write the log but not read this key cannot recompute the chain."""
    key_file_group: Annotated[int, Field(ge=0)] | None = None
    """Also accept a key file readable (never writable) by this group: a Kubernetes Secret under the pod's fsGroup."""
    retention_days: Annotated[int, Field(ge=1)] = 180
    """Records older than this are pruned, by the gateway itself: at start, daily, and on POST /admin/audit/prune."""
    head_export_s: Annotated[float, Field(gt=0)] = 60
    """How often the gateway logs the chain's head (seq and hash), for `audit verify --expect-head` against a truncated log."""
    log_text: StrictBool = False
    """Also record prompts and outputs."""


class Alerts(Section):
    """Anomaly alerts for auditors."""

    denied_burst: Annotated[int, Field(ge=1)] = 5
    """Denied requests from one address that raise an alert..."""
    window_s: Annotated[float, Field(gt=0)] = 60
    """...within this many seconds."""


class Deadlines(Section):
    """How long a client may take to send its request; slow clients are cut off so they cannot hold every connection."""

    header_s: Annotated[float, Field(gt=0)] = 10
    """Seconds from the connection's TLS handshake (or the end of its previous answer) to the end of the request's
    headers; a connection still sending them is closed."""
    body_s: Annotated[float, Field(gt=0)] = 20
    """Seconds from the end of the headers to the end of the body; later, the answer is 408 and the connection is closed."""
    keep_alive_s: Annotated[int, Field(ge=1)] = 5
    """Seconds an idle keep-alive connection stays open between requests."""


class RateLimit(Section):
    """A token bucket per API key: it holds `burst` requests and refills at `requests_per_minute`."""

    requests_per_minute: Annotated[float, Field(gt=0, le=60000)] = 600
    """Sustained requests per minute one key may send (429 with Retry-After above); at most 60,000."""
    burst: Annotated[int, Field(ge=1, le=10000)] = 60
    """Requests one key may send at once before the sustained rate applies."""


class RefusalLimit(Section):
    """A token bucket per client address (IPv6 by /64) for the requests the gateway refuses before a key is admitted
    (malformed HTTP, bad headers, no or unknown key, address not allowed, over a key's rate). Within it each refusal
    gets its own answer and audit record; above it the answer is 429 with Retry-After and the refusals are counted,
    then written as one aggregated audit record per address and reason every `summary_every_s`."""

    per_minute: Annotated[float, Field(gt=0, le=60000)] = 60
    """Refused requests per minute one address may get answered and audited one by one."""
    burst: Annotated[int, Field(ge=1, le=10000)] = 30
    """Refused requests one address may get at once before the per-minute rate applies."""
    summary_every_s: Annotated[float, Field(ge=1, le=3600)] = 60
    """How often the counts of refusals past the bucket are written as aggregated audit records."""
    max_addresses: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000
    """Addresses tracked at once (about 200 bytes each); past it the longest-quiet one is forgotten."""


RateLimits = create_model(
    "RateLimits",
    __base__=Section,
    __doc__="Per-key request rates, by the key's role (counted in each gateway process).",
    **{name: (RateLimit, Field(RateLimit(requests_per_minute=role.requests_per_minute, burst=role.burst),
                               description=f"Each {name} key's rate."))
       for name, role in ROLES.items()},
)


class Gateway(Section):
    """The TLS 1.3, role-based, audited OpenAI-compatible gateway."""

    host: str = "127.0.0.1"
    """Listen address."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8443
    """HTTPS port."""
    upstream: str | None = None
    """URL of an OpenAI-compatible engine server to forward to; null serves the package in-process."""
    upstream_key_env: str | None = None
    """Environment variable holding the upstream server's own API key; null sends none."""
    reasoning: Literal["split", "raw"] = "split"
    """A thinking model's answers (a think block first): split gives the reasoning in message.reasoning_content
    (streamed as delta.reasoning_content) and the answer in content, as DeepSeek's API and vLLM's reasoning parsers
    do; raw keeps the generated text, think block included, in content. Upstream engine servers split it themselves
    (vLLM --reasoning-parser deepseek_r1)."""
    api_keys: str = "keys/api_keys.json"
    """API-key hashes and roles (owner-only)."""
    package_root: str | None = None
    """The folder POST /admin/deploy takes packages from, by digest (<root>/<sha256>); null is package.backup_dir,
    where the backup rule keeps them. Clients never name a path."""
    tls: Tls = Tls()
    """Server certificate; a local CA and certificate are made when missing."""
    allow: Allow = Allow()
    """Client address allow-list (CIDRs) per role."""
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs of proxies whose X-Forwarded-For is believed."""
    limits: Limits = Limits()
    """Request limits (admins adjust them at run time)."""
    deadlines: Deadlines = Deadlines()
    """How long a client may take to send its request."""
    rate_limits: RateLimits = RateLimits()
    """Per-key request rates, by the key's role."""
    refusal_limits: RefusalLimit = RefusalLimit()
    """Per-address limit on refused requests answered and audited one by one (floods are aggregated)."""
    audit: Audit = Audit()
    """The hash-chained audit log."""
    alerts: Alerts = Alerts()
    """Anomaly alerts for auditors."""
    graceful_shutdown_s: Annotated[float, Field(ge=0)] = 30
    """On SIGTERM, how long in-flight requests may finish."""
    max_connections: Annotated[int, Field(ge=1)] = 512
    """Open connections the gateway holds (about 280 KiB each under asyncio's TLS). When a new one would exceed it, the
    connection that has waited longest for its request headers is closed; when every connection is busy with a
    request, new requests get 503. Size it above the well-formed clients plus the slow ones you expect."""


class Canary(Section):
    """Checks a local rollout must pass before promotion."""

    samples: Annotated[int, Field(ge=1)] = 16
    """Held-out prompts whose served answers must equal the engine's own."""
    latency_p95_s: Annotated[float, Field(gt=0)] = 10
    """p95 latency SLO under the benchmark's load, seconds."""
    requests: Annotated[int, Field(ge=1)] = 16
    """Requests in the latency check."""
    ready_timeout_s: Annotated[float, Field(gt=0)] = 300
    """Seconds the gateway may take to become ready."""


class Secrets(Section):
    """Names of the Secrets the pods reference."""

    tls: str = "ft2prod-gateway-tls"
    """kubernetes.io/tls Secret with the server certificate."""
    api_keys: str = "ft2prod-api-keys"
    """Secret with api_keys.json (hashes only)."""
    kms: str = "ft2prod-kms"
    """Secret with the KMS credential."""
    audit_key: str = "ft2prod-audit-key"
    """Secret with the audit chain's key (key audit.key), mounted in the gateway container only."""


class PodResources(Section):
    """The gateway container's resources (Kubernetes quantities); the engine container asks for tp x pp GPUs."""

    cpu: str = "2"
    """CPU request."""
    memory: str = "8Gi"
    """Memory request."""
    memory_limit: str = "16Gi"
    """Memory limit (the in-process engine's weights and KV cache live here)."""


class Kubernetes(Section):
    """Kubernetes manifests (kustomize), and applying them."""

    namespace: str = "ft2prod"
    """Namespace."""
    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")] = "ft2prod-gateway"
    """Name of the Deployment, Service, NetworkPolicy and PodDisruptionBudget."""
    image: str = "registry.internal/ft2prod/gateway:0.1.0"
    """Gateway image (envs/gateway.Dockerfile); rendering the manifests requires it by digest, NAME[:TAG]@sha256:<64 hex>."""
    engine_image: str | None = None
    """Engine server image for engine.backend tensorrt_llm; by digest, as image. null: the pinned TensorRT-LLM
    release's image (workflow/engine/release.py), which rendering asks you to name by its digest."""
    kms_egress_cidrs: tuple[str, ...] = ()
    """Address ranges (CIDRs) of the KMS endpoint (Vault, a network HSM) the pods may reach; required when
    package.kms.provider is vault. All other egress is denied (DNS is allowed only together with these)."""
    replicas: Annotated[int, Field(ge=1)] = 2
    """Gateway pods."""
    package_claim: str = "ft2prod-packages"
    """PersistentVolumeClaim holding the packages (read-only)."""
    secrets: Secrets = Secrets()
    """Names of the Secrets the pods reference."""
    resources: PodResources = PodResources()
    """The gateway container's resources (Kubernetes quantities)."""
    audit_storage: str = "10Gi"
    """Size of the audit log's PersistentVolumeClaim (ReadWriteMany, shared by the replicas)."""
    startup_timeout_s: Annotated[int, Field(ge=10)] = 600
    """Startup probe budget for loading weights."""
    kubernetes_version: str = "1.32.0"
    """Kubernetes API version the manifests are validated against."""
    context: str | None = None
    """kubectl context to apply to; null renders and validates only."""


class Rollout(Section):
    """Serving gateway, canary checks and promotion (local), or Kubernetes manifests."""

    target: Literal["local", "kubernetes"] = "local"
    """local starts the gateway here, runs the canary and promotes; kubernetes renders and validates manifests,
    and applies them when a context is set."""
    gateway: Gateway = Gateway()
    """The TLS 1.3, role-based, audited OpenAI-compatible gateway."""
    canary: Canary = Canary()
    """Checks a local rollout must pass before promotion."""
    kubernetes: Kubernetes = Kubernetes()
    """Kubernetes manifests (kustomize), and applying them."""


class TrackingConfig(Section):
    """Where MLflow records runs."""

    uri: str = "sqlite:///results/mlflow.db"
    """MLflow tracking URI; a relative sqlite path is taken from the working directory. MLFLOW_TRACKING_URI overrides it."""
    experiment: Annotated[str, Field(min_length=1)] = "ft2prod"
    """MLflow experiment name."""


class Config(Section):
    """ft2prod workflow configuration (experiment settings only; machines live in profiles/)."""

    run_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$")] = "embedded-default"
    """Name of this pipeline; the MLflow parent run is named after it."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Seed for the data split, training order and initialisation."""
    base_model: str = "bootstrap"
    """"bootstrap" builds a small base model locally (the embedded default); anything else is the path of a local
    Hugging Face causal-LM checkpoint directory (config.json, weights, tokenizer with a chat template)."""
    cluster: Cluster = Cluster()
    """The machines the plan rule checks training and serving memory against before anything runs."""
    bootstrap: BootstrapConfig = BootstrapConfig()
    """Shape and pretraining of the locally built base model; used only when base_model is "bootstrap"."""
    data: DataConfig = DataConfig()
    """The fine-tuning dataset and how it is checked and split."""
    finetune: FinetuneConfig = FinetuneConfig()
    """Fine-tuning with DeepSpeed through the Transformers Trainer."""
    evaluate: EvalConfig = EvalConfig()
    """Evaluation on the held-out test split and the quality gate."""
    quantize: QuantizeConfig = QuantizeConfig()
    """Post-training quantization with NVIDIA ModelOpt and its accuracy gate."""
    engine: EngineConfig = EngineConfig()
    """Inference engine building."""
    benchmark: LoadConfig = LoadConfig()
    """Continuous-load benchmark of each engine."""
    select: SelectConfig = SelectConfig()
    """How the production scheme is chosen."""
    package: PackageConfig = PackageConfig()
    """Encrypted, signed packaging of the selected engine, registration and backup."""
    rollout: Rollout = Rollout()
    """Serving gateway, canary checks and promotion (local), or Kubernetes manifests."""
    tracking: TrackingConfig = TrackingConfig()
    """Where MLflow records runs."""


# --- errors a person can act on ---------------------------------------------------------------------------------

def _field_type(root: type[BaseModel], loc: tuple) -> object:
    """The declared type at a location in `root` (model fields, tuple items, by index)."""
    node: object = root
    for part in loc:
        node = _strip(node)
        if isinstance(part, int):
            args = [a for a in typing.get_args(node) if a is not Ellipsis]
            node = args[0] if args else None
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        else:
            return None
    return _strip(node)


def _strip(node):
    while typing.get_origin(node) is Annotated:
        node = typing.get_args(node)[0]
    return node


def _where(loc: tuple) -> str:
    return ".".join(map(str, loc)) or "(top level)"


def _line(error: dict, root: type[BaseModel], what: str) -> str:
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        parent = _field_type(root, loc[:-1])
        allowed = ", ".join(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else "none"
        return f"{what}: {_where(loc[:-1])}: unknown key(s) {loc[-1]!r}; allowed: {allowed}"
    if error["type"] == "literal_error":
        declared = _field_type(root, loc)
        values = typing.get_args(declared) if typing.get_origin(declared) is Literal else ()
        shown = ", ".join(map(repr, values)) or error["ctx"]["expected"]
        return f"{what}: {_where(loc)}: {error['input']!r} is not allowed; allowed values: {shown}"
    found = "" if isinstance(error["input"], dict) else f" (got {error['input']!r})"
    return f"{what}: {_where(loc)}: {error['msg'].removeprefix('Value error, ')}{found}"


def errors(exc: ValidationError, root: type[BaseModel] = None, what: str = "config") -> str:
    """One line per problem of validating `root` (the whole config by default): the key, what was found and what is
    allowed."""
    return "\n".join(_line(error, root or Config, what) for error in exc.errors())


def settings(config: dict) -> Config:
    """The typed config, every default filled in; ConfigError lists every problem, one line each. Jobs call it on the
    WHOLE config Snakemake hands them (`settings(snakemake.config)`), never on a section picked apart from it."""
    try:
        return Config.model_validate(config or {})
    except ValidationError as exc:
        raise ConfigError(errors(exc)) from None


def check(config: dict) -> dict:
    """config completed with every default, as plain data (what Snakemake keeps and hands to every job);
    ConfigError when it is wrong."""
    return settings(config).model_dump(mode="json")


def load(path: str | Path) -> Config:
    """A config file as the typed config, checked and completed with the defaults (for tools run outside Snakemake)."""
    return settings(yaml.safe_load(Path(path).read_text()) or {})


# --- the generated schema ---------------------------------------------------------------------------------------

def _untitled(node):
    """The schema without pydantic's titles (the key names already say it)."""
    if isinstance(node, dict):
        return {k: _untitled(v) for k, v in node.items() if not (k == "title" and isinstance(v, str))}
    if isinstance(node, list):
        return [_untitled(v) for v in node]
    return node


def schema() -> dict:
    """config/schema.yaml: the JSON schema of Config (for editors and external validators)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **_untitled(Config.model_json_schema(mode="validation"))}


def schema_text() -> str:
    header = "# Generated from workflow/config.py by `make schema`; do not edit by hand.\n"
    return header + yaml.safe_dump(schema(), sort_keys=False, width=120, allow_unicode=True)


if __name__ == "__main__":
    # python -m workflow.config > config/schema.yaml
    sys.stdout.write(schema_text())
