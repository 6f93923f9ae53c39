"""The engine interface: what every engine backend implements, and what a generation asks of it.

    engine.stream(GenerationRequest(prompt_ids=[1, 2, 3], max_new_tokens=16))   # token ids as they are made

The gateway, evaluation, the benchmark and the canary call engines only through `Engine` and `GenerationRequest`
(and load them with workflow/engine/runtime.py). A generation setting is one field of `GenerationRequest`, with a
default so no caller changes, read by each backend's generation loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from workflow.engine.manifest import EngineManifest
from workflow.engine.sampling import GREEDY, SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the prompt as token ids and how to continue it. Greedy decoding unless a field says otherwise."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    """At most this many tokens are generated (the end-of-sequence token, if reached, is the last one streamed)."""
    min_new_tokens: int = 0
    """The end-of-sequence token is suppressed until this many tokens were generated (benchmarks fix output lengths)."""
    sampling: SamplingParams = GREEDY
    """How the next token is chosen (workflow/engine/sampling.py): greedy by default, as evaluation and the canary use."""

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("generate: the prompt is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.min_new_tokens < 0:
            raise ValueError(f"generate: min_new_tokens must be 0 or more (got {self.min_new_tokens})")


@runtime_checkable
class Engine(Protocol):
    """A loaded engine. `stream` may be called from many threads at once; the engine batches them as it can."""

    manifest: EngineManifest
    """What the engine was built from and for (engine_manifest.json beside it)."""
    max_batch_size: int
    """Requests it generates concurrently: callers size their thread pools by it (1 when it does not batch)."""

    def stream(self, request: GenerationRequest) -> Iterator[int]:
        """The generated token ids, one at a time as they are made."""
        ...

    def close(self) -> None:
        """Stop generating and free what the engine holds (threads, device memory); requests in flight fail."""
        ...
