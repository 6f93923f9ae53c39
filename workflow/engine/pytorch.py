"""PyTorch engines: the fine-tuned checkpoint served by Transformers, in bf16 on a GPU (fp32 on a CPU), for GPU hosts
where neither TensorRT-LLM nor a CUDA build of ONNX Runtime runs (the lent H200: neither can be installed there).

    engine.backend: pytorch     # results/engine/pytorch/bf16: the checkpoint, its tokenizer and engine_manifest.json

It serves the unquantized baseline only: ModelOpt's quantized checkpoints are fake-quantized in PyTorch (slower than
bf16); their speed needs TensorRT-LLM's or vLLM's kernels (docs/models.md shows both serving them behind the gateway).

Requests that arrive together are generated as one batch (Transformers' `generate`, left-padded, dynamic KV cache);
a request that arrives while a batch runs waits for the next one. Each request picks its own next token from its row
of logits with its own sampling parameters and random generator (workflow/engine/sampling.py, as the ONNX Runtime
batching loop does): a logits processor hands `generate` the chosen token, and a stopping criterion ends each row when
its request is done, so a seeded request gets the same tokens whoever shares its batch.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from workflow.engine.batching import DONE, receive
from workflow.engine.interface import GenerationRequest
from workflow.engine.manifest import EngineManifest, Target, check_target
from workflow.engine.sampling import TokenHistory, next_token
from workflow.generation import load_model
from workflow.schemes import BASELINE, SCHEMES

log = logging.getLogger(__name__)


def here() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def target(device: torch.device) -> Target:
    """The manifest's target: the Transformers release that loads the checkpoint, on cuda or cpu."""
    return Target(backend="pytorch", backend_version=version("transformers"), device=device.type)


def build(model_dir: str | Path, engine_dir: str | Path, scheme: str, device: torch.device, source_sha256: str) -> EngineManifest:
    """The engine folder: the fine-tuned checkpoint's files (weights, config, tokenizer, generation config) and the
    manifest. Only the unquantized baseline: see the module's docstring."""
    if not SCHEMES[scheme].baseline:
        raise ValueError(f"build_engine: engine.backend pytorch serves the unquantized baseline ({BASELINE}) only, not {scheme}; "
                         "use engine.backend: tensorrt_llm for quantized engines")
    engine_dir = Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    for source in Path(model_dir).iterdir():
        if source.is_file():
            shutil.copy2(source, engine_dir / source.name)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    manifest = EngineManifest(scheme=scheme, precision=f"{dtype} weights (Transformers generate on {device.type})",
                              target=target(device), source_sha256=source_sha256, build={"dtype": dtype},
                              algorithm="none: unquantized weights")
    manifest.write(engine_dir)
    return manifest


@dataclass(eq=False)
class _Request:
    asked: GenerationRequest
    out: queue.Queue = field(default_factory=queue.Queue)
    generated: int = 0
    finished: bool = False
    """Done, or abandoned by its caller: its row stops at the next step."""

    def __post_init__(self) -> None:
        self.rng = self.asked.sampling.generator()
        self.history = TokenHistory(self.asked.prompt_ids if self.asked.sampling.repetition_penalty != 1.0 else ())


class _Chooser:
    """`generate`'s logits processor for one batch: each running request's next token, from its own sampling."""

    def __init__(self, requests: list[_Request], eos_ids: list[int]) -> None:
        self.requests, self.eos_ids = requests, eos_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = scores.float().cpu().numpy()
        forced = torch.full_like(scores, -torch.inf)
        for row, request in enumerate(self.requests):
            token = self.eos_ids[0] if request.finished and self.eos_ids else 0
            if not request.finished:
                token = self._emit(request, rows[row])
            forced[row, token] = 0.0
        return forced

    def _emit(self, request: _Request, logits: np.ndarray) -> int:
        asked = request.asked
        if request.generated < asked.min_new_tokens:
            logits = logits.copy()
            logits[self.eos_ids] = -np.inf
        token = next_token(logits, asked.sampling, request.rng, request.history)
        request.generated += 1
        request.history.add(token)
        request.out.put(token)
        if token in self.eos_ids or request.generated >= asked.max_new_tokens:
            request.out.put(DONE)
            request.finished = True
        return token

    def stopping(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        """`generate`'s stopping criterion: the rows whose request is done."""
        return torch.tensor([r.finished for r in self.requests], device=input_ids.device)


class PytorchEngine:
    """A PyTorch engine folder's model, serving concurrent `stream` calls from one background loop
    (workflow/engine/interface.py `Engine`)."""

    def __init__(self, engine_dir: str | Path, max_batch_size: int = 8, device: torch.device | None = None) -> None:
        self.manifest = EngineManifest.read(engine_dir)
        device = device or here()
        check_target(self.manifest, target(device))
        self.model = load_model(engine_dir, device)
        config = self.model.config
        eos = self.model.generation_config.eos_token_id
        eos = config.eos_token_id if eos is None else eos
        self.eos_ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        pad = self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids or [0])[0]
        self.context_length = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self.max_batch_size = max_batch_size
        self.waiting: queue.Queue[_Request | None] = queue.Queue()
        self.closed = False
        self.loop = threading.Thread(target=self._serve, name="pytorch-engine", daemon=True)
        self.loop.start()

    def stream(self, request: GenerationRequest) -> Iterator[int]:
        prompt = len(request.prompt_ids)
        if prompt + request.max_new_tokens > self.context_length:
            raise ValueError(f"generate: {prompt} prompt tokens plus max_new_tokens {request.max_new_tokens} exceed the "
                             f"model's context length {self.context_length}; shorten the prompt or ask for fewer tokens")
        outside = [token for token in request.sampling.logit_bias if not 0 <= token < self.vocab_size]
        if outside:
            raise ValueError(f"generate: logit_bias names token ids outside the vocabulary (0..{self.vocab_size - 1}): {outside[:5]}")
        if self.closed:
            raise RuntimeError("generate: the engine was unloaded")
        entry = _Request(request)
        self.waiting.put(entry)
        return receive(entry)

    def close(self) -> None:
        """Finish the batch in flight, refuse what waits, stop the loop and free the GPU memory."""
        if self.closed:
            return
        self.closed = True
        self.waiting.put(None)
        if threading.current_thread() is not self.loop:
            self.loop.join(timeout=600)
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _serve(self) -> None:
        while (first := self.waiting.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch_size:
                try:
                    entry = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if entry is None:
                    self.waiting.put(None)
                    break
                batch.append(entry)
            try:
                self._generate([r for r in batch if not r.finished])
            except Exception as err:  # the batch failed: each of its requests gets the error, the loop goes on
                log.exception("PyTorch engine batch failed")
                for request in batch:
                    request.out.put(RuntimeError(f"generate: the engine failed ({type(err).__name__}: {err})"))
        while True:  # closed: what still waits is refused
            try:
                entry = self.waiting.get_nowait()
            except queue.Empty:
                return
            if entry is not None:
                entry.out.put(RuntimeError("generate: the engine was unloaded"))

    @torch.inference_mode()
    def _generate(self, batch: list[_Request]) -> None:
        if not batch:
            return
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        prompts = [list(r.asked.prompt_ids) for r in batch]
        width = max(len(p) for p in prompts)
        device = next(self.model.parameters()).device
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        chooser = _Chooser(batch, self.eos_ids)
        # greedy over the chooser's forced scores, with no processor of the model's own (its sampling defaults are the
        # gateway's to apply, per request)
        settings = GenerationConfig(do_sample=False, repetition_penalty=1.0, pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None,
                                    max_new_tokens=max(r.asked.max_new_tokens for r in batch))
        self.model.generate(input_ids=ids, attention_mask=mask, generation_config=settings,
                            logits_processor=LogitsProcessorList([chooser]),
                            stopping_criteria=StoppingCriteriaList([chooser.stopping]))
        for request in batch:  # a row generate ended without the chooser ending it (it never does; kept safe)
            if not request.finished:
                request.finished = True
                request.out.put(DONE)
