"""Sampling: the next token from one row of logits, a request's sampling parameters and its own random generator.

    from workflow.engine.sampling import GREEDY, SamplingParams, TokenHistory, next_token
    params = SamplingParams(temperature=0.6, top_p=0.95, seed=7)
    rng, history = params.generator(), TokenHistory(prompt_ids)
    token = next_token(logits_row, params, rng, history)   # then history.add(token)

Every engine that sees logits calls this (the ONNX Runtime batching loop, an in-process torch engine with
`logits.float().cpu().numpy()`); engines that sample themselves (TensorRT-LLM, og.Generator) get the same fields.
Each request owns its generator (seeded from `seed`, or fresh entropy without one), so the requests sharing a batch
never draw from each other's stream: the same seed gives the same tokens whoever else is decoding.

The order is vLLM's and Hugging Face's: logit bias, then repetition, presence and frequency penalties, then
temperature, then top-k and top-p on the tempered distribution; temperature 0 is greedy (argmax after the bias and
penalties).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 decodes greedily."""
    top_p: float = 1.0
    """Keep the most likely tokens whose probabilities sum to top_p (1 keeps all)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 keeps all)."""
    seed: int | None = None
    """Seeds this request's own generator; None draws fresh entropy."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI's definition)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated."""
    repetition_penalty: float = 1.0
    """Hugging Face's: the logits of tokens in the prompt or the output divided by it (multiplied when negative)."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit (-100 bans it, 100 all but forces it)."""

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError(f"sampling needs temperature >= 0, 0 < top_p <= 1, top_k >= 0 and repetition_penalty > 0 "
                             f"(got {self.temperature}, {self.top_p}, {self.top_k}, {self.repetition_penalty})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def generator(self) -> np.random.Generator:
        """This request's own generator (numpy takes seeds >= 0: a negative seed is taken modulo 2**64)."""
        return np.random.default_rng(None if self.seed is None else self.seed % 2**64)


GREEDY = SamplingParams()


class TokenHistory:
    """What the penalties look at: the prompt's tokens (repetition) and the generated ones, counted."""

    def __init__(self, prompt_ids: Iterable[int] = ()) -> None:
        self.prompt = set(prompt_ids)
        self.generated: Counter[int] = Counter()

    def add(self, token: int) -> None:
        self.generated[token] += 1


def adjusted(logits: np.ndarray, params: SamplingParams, history: TokenHistory | None = None) -> np.ndarray:
    """The logits after the bias and the penalties (a float64 copy)."""
    out = np.array(logits, dtype=np.float64)
    if params.logit_bias:
        ids = np.fromiter(params.logit_bias, dtype=np.int64)
        out[ids] += np.fromiter(params.logit_bias.values(), dtype=np.float64)
    if history is None or not params.penalised:
        return out
    if params.repetition_penalty != 1.0 and (history.prompt or history.generated):
        seen = np.fromiter(history.prompt | history.generated.keys(), dtype=np.int64)
        values = out[seen]
        out[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if history.generated:
        ids = np.fromiter(history.generated, dtype=np.int64)
        counts = np.fromiter(history.generated.values(), dtype=np.float64)
        out[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return out


def keep_mask(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The tokens top-k and then top-p (nucleus) keep from these (tempered) logits; the most likely always stays.
    Ties at the k-th logit are all kept, as vLLM's and Hugging Face's top-k do."""
    keep = np.isfinite(logits) | (logits == logits.max())
    if 0 < top_k < logits.size:
        keep &= logits >= np.partition(logits, -top_k)[-top_k]
    if top_p < 1.0:
        probs = _softmax(np.where(keep, logits, -np.inf))
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]  # mass of the more likely tokens
        nucleus = np.zeros_like(keep)
        nucleus[order[before < top_p]] = True
        keep &= nucleus
    return keep


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None = None,
               history: TokenHistory | None = None) -> int:
    """The next token of one request from its row of logits (vocabulary-sized)."""
    scores = adjusted(logits, params, history)
    if params.greedy:
        return int(scores.argmax())
    scores /= params.temperature
    probs = _softmax(np.where(keep_mask(scores, params.top_k, params.top_p), scores, -np.inf))
    cumulative = np.cumsum(probs)
    draw = (rng if rng is not None else params.generator()).random() * cumulative[-1]
    return int(min(np.searchsorted(cumulative, draw, side="right"), probs.size - 1))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits[np.isfinite(logits)].max())
    return shifted / shifted.sum()


def generation_defaults(model_dir: str | Path) -> dict:
    """The sampling a model's generation_config.json asks for, used where a request leaves a field out (vLLM's
    `--generation-config auto` does the same): temperature (1.0 unless given), and top_p, top_k and
    repetition_penalty where the file sets them, when it samples (do_sample: true); nothing, i.e. greedy decoding,
    when it does not or there is no file. DeepSeek-R1's distills ship temperature 0.6 and top_p 0.95."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    if not config.get("do_sample"):
        return {}
    defaults = {"temperature": config.get("temperature", 1.0)}
    defaults |= {name: config[name] for name in ("top_p", "top_k", "repetition_penalty") if config.get(name) is not None}
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: its sampling settings cannot be used ({err})") from None
    return defaults


def keep_generation_config(model_dir: str | Path, engine_dir: str | Path) -> None:
    """Carry the model's generation_config.json into its engine folder (the package), where the gateway reads its
    sampling defaults; engine builders do not copy it."""
    source = Path(model_dir) / "generation_config.json"
    if source.is_file() and not (Path(engine_dir) / source.name).exists():
        shutil.copyfile(source, Path(engine_dir) / source.name)
