"""Continuous batching for ONNX Runtime GenAI engines on CPU: a request joins the running batch at the next step,
and leaves it the step it finishes.

onnxruntime-genai 0.18 has a request API (og.Engine / og.Request), but on CPU it schedules with its static batch
scheduler: its dynamic scheduler needs a PagedAttention model, which the builder makes for CUDA and WebGPU only,
so a request that arrives while a batch runs waits until the whole batch has finished (measured: a request
submitted at step 4 produced its first token at step 11, after the batch's longest request). So the engine's own
ONNX model is driven here with ONNX Runtime, batching at every decode step as Orca and vLLM do:

- every request owns a row (slot) of one key/value buffer per layer, which GroupQueryAttention updates in place
  (past and present bound to the same memory, as onnxruntime-genai does itself);
- a new request is prefilled alone into a free slot, then joins the next decode step of everyone running;
- each row keeps its own length in the attention mask, so rotary positions and attention are those of the request
  run alone: greedy tokens equal og.Generator's (tests/test_engine.py);
- each request picks its next token from its own row of logits with its own sampling parameters and random
  generator (workflow/engine/sampling.py), so a seeded request gets the same tokens whoever shares its batch;
- a finished (or abandoned) request frees its slot at once; the last slot moves into it, so a step always runs
  rows 0..n-1 of the buffer.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workflow.engine.interface import GenerationRequest
from workflow.engine.sampling import TokenHistory, next_token

log = logging.getLogger(__name__)

NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
DONE = object()


def _close_at_exit(batcher_ref: weakref.ref) -> None:
    batcher = batcher_ref()
    if batcher is not None:
        batcher.close()


def receive(request) -> Iterator[int]:
    """The tokens a batching loop puts on `request.out` until DONE (an exception put there is raised); a caller that
    stops reading marks the request finished, and the loop frees its row at the next step."""
    try:
        while (item := request.out.get()) is not DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        request.finished = True


@dataclass(eq=False)
class _Request:
    asked: GenerationRequest
    prompt: list[int]
    max_new: int
    min_new: int
    out: queue.Queue = field(default_factory=queue.Queue)
    length: int = 0
    """Tokens held in the request's key/value row."""
    generated: int = 0
    last: int = -1
    finished: bool = False
    """Done, or abandoned by its caller: its slot is freed at the next step."""

    def __post_init__(self) -> None:
        self.rng = self.asked.sampling.generator()
        self.history = TokenHistory(self.prompt if self.asked.sampling.repetition_penalty != 1.0 else ())


class ContinuousBatcher:
    """One engine folder's model, serving any number of concurrent `stream` calls from one background loop."""

    def __init__(self, engine_dir: str | Path, max_batch_size: int = 8) -> None:
        import onnxruntime as ort

        if max_batch_size < 1:
            raise ValueError(f"engine.onnxruntime.max_batch_size must be at least 1 (got {max_batch_size})")
        engine_dir = Path(engine_dir)
        genai = json.loads((engine_dir / "genai_config.json").read_text())["model"]
        decoder = genai["decoder"]
        self.max_batch_size, self.context_length = max_batch_size, genai["context_length"]
        self.vocab_size = genai["vocab_size"]
        eos = genai["eos_token_id"]
        self.eos_ids = list(eos) if isinstance(eos, list) else [eos]
        self.session = ort.InferenceSession(str(engine_dir / decoder["filename"]), providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layers = decoder["num_hidden_layers"]
        self.past = [(f"past_key_values.{n}.key", f"past_key_values.{n}.value") for n in range(self.layers)]
        known = {"input_ids", "attention_mask", "position_ids", *(name for pair in self.past for name in pair)}
        if set(inputs) - known:
            raise ValueError(f"continuous batching drives decoder models with inputs {sorted(known)[:3]} and past key/values; "
                             f"{engine_dir} also needs {sorted(set(inputs) - known)}")
        self.ids_type = NUMPY_TYPES[inputs["input_ids"].type]
        self.mask_type = NUMPY_TYPES[inputs["attention_mask"].type]
        self.kv_type = NUMPY_TYPES[inputs[self.past[0][0]].type]
        self.with_positions = "position_ids" in inputs
        self.kv_shape = (decoder["num_key_value_heads"], decoder["head_size"])
        self.capacity = 0
        self.buffers: list[tuple[np.ndarray, np.ndarray]] = []
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.wake = threading.Condition()
        self.closed = False
        self.loop = threading.Thread(target=self._serve, name="continuous-batcher", daemon=True)
        self.loop.start()
        atexit.register(_close_at_exit, weakref.ref(self))  # no inference left running while the interpreter exits

    def close(self) -> None:
        """Finish the step in flight, refuse what waits, and stop the loop (its owner, OrtEngine, calls this when
        it is dropped, e.g. when the gateway swaps in a newly deployed engine)."""
        with self.wake:
            self.closed = True
            self.wake.notify()
        if threading.current_thread() is not self.loop:
            self.loop.join(timeout=60)

    def stream(self, asked: GenerationRequest) -> Iterator[int]:
        """Greedy tokens for one request as they are generated; the end-of-sequence token, if reached, is the last."""
        prompt, max_new = list(asked.prompt_ids), asked.max_new_tokens
        if len(prompt) + max_new > self.context_length:
            raise ValueError(f"generate: {len(prompt)} prompt tokens plus max_new_tokens {max_new} exceed the "
                             f"engine's context length {self.context_length}; shorten the prompt or ask for fewer tokens")
        outside = [token for token in asked.sampling.logit_bias if not 0 <= token < self.vocab_size]
        if outside:
            raise ValueError(f"generate: logit_bias names token ids outside the vocabulary (0..{self.vocab_size - 1}): {outside[:5]}")
        request = _Request(asked, prompt, max_new, min(asked.min_new_tokens, max_new))
        with self.wake:
            if self.closed:
                raise RuntimeError("generate: the engine was unloaded")
            self.waiting.append(request)
            self.wake.notify()
        return receive(request)


    def _serve(self) -> None:
        while True:
            with self.wake:
                while not self.waiting and not self.running and not self.closed:
                    self.wake.wait()
                if self.closed:
                    for request in [*self.waiting, *self.running]:
                        request.out.put(RuntimeError("generate: the engine was unloaded"))
                    self.waiting.clear()
                    self.running = []
                    return
                admitted = []
                while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
                    admitted.append(self.waiting.popleft())
            try:
                for request in admitted:
                    if not request.finished:
                        self._prefill(request)
                if self.running:
                    self._decode()
            except Exception as err:  # the step failed: every request in it gets the error, the loop goes on
                log.exception("continuous batching step failed")
                for request in [*admitted, *self.running]:
                    request.out.put(RuntimeError(f"generate: the engine failed ({type(err).__name__}: {err})"))
                self.running = []

    def _reserve(self, length: int) -> None:
        """Key/value rows long enough for `length` tokens (grown by doubling, copied once)."""
        if length <= self.capacity:
            return
        capacity = min(self.context_length, max(length, 2 * self.capacity, 256))
        shape = (self.max_batch_size, self.kv_shape[0], capacity, self.kv_shape[1])
        grown = [(np.zeros(shape, self.kv_type), np.zeros(shape, self.kv_type)) for _ in range(self.layers)]
        for (key, value), (old_key, old_value) in zip(grown, self.buffers):
            key[:, :, :self.capacity], value[:, :, :self.capacity] = old_key, old_value
        self.buffers, self.capacity = grown, capacity

    def _forward(self, rows: slice, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Logits of the last position of every row; the rows' key/value slots are updated in place."""
        from onnxruntime import OrtValue

        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids.astype(self.ids_type))
        binding.bind_cpu_input("attention_mask", mask.astype(self.mask_type))
        if self.with_positions:
            binding.bind_cpu_input("position_ids", positions.astype(self.ids_type))
        for (key_name, value_name), (key, value) in zip(self.past, self.buffers):
            for name, buffer in ((key_name, key), (value_name, value)):
                shared = OrtValue.ortvalue_from_numpy(buffer[rows])  # a view: no copy, present written in place
                binding.bind_ortvalue_input(name, shared)
                binding.bind_ortvalue_output(name.replace("past_key_values", "present"), shared)
        binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()[:, -1, :]

    def _prefill(self, request: _Request) -> None:
        self._reserve(len(request.prompt) + request.max_new)
        slot, n = len(self.running), len(request.prompt)
        logits = self._forward(slice(slot, slot + 1), np.array([request.prompt]), np.ones((1, n)), np.arange(n)[None])
        request.length = n
        self.running.append(request)
        self._emit(request, logits[0])
        self._release_finished()

    def _decode(self) -> None:
        rows = len(self.running)
        total = max(r.length for r in self.running) + 1
        mask = np.zeros((rows, total))
        for row, request in enumerate(self.running):
            mask[row, :request.length + 1] = 1
        ids = np.array([[r.last] for r in self.running])
        positions = np.array([[r.length] for r in self.running])
        logits = self._forward(slice(0, rows), ids, mask, positions)
        for row, request in enumerate(self.running):
            request.length += 1
            self._emit(request, logits[row])
        self._release_finished()

    def _emit(self, request: _Request, logits: np.ndarray) -> None:
        if request.generated < request.min_new:
            logits = logits.copy()
            logits[self.eos_ids] = -np.inf
        request.last = next_token(logits, request.asked.sampling, request.rng, request.history)
        request.generated += 1
        request.history.add(request.last)
        request.out.put(request.last)
        if request.last in self.eos_ids or request.generated >= request.max_new:
            request.out.put(DONE)
            request.finished = True

    def _release_finished(self) -> None:
        """Drop finished and abandoned requests; the last running row moves into each freed slot."""
        for slot in reversed(range(len(self.running))):
            if not self.running[slot].finished:
                continue
            last = len(self.running) - 1
            if slot != last:
                length = self.running[last].length
                for key, value in self.buffers:
                    key[slot, :, :length], value[slot, :, :length] = key[last, :, :length], value[last, :, :length]
                self.running[slot] = self.running[last]
            self.running.pop()
