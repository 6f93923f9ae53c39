"""How an answer is scored against its reference: evaluate.metric (exact, contains, regex, or the user's scorer).

    from workflow.metrics import grader; g = grader(cfg, tokenizer, rows); g.score(completion_text, reference)

The answer is the text after the last </think> (or the whole text when the model does not think); exact, contains and
regex compare it with the reference after normalisation (case, whitespace, trailing punctuation, numbers written
"1,000" or "1000.0"). A user's scorer is `module:function`, imported from evaluate.scorer_path, called as
function(answer, reference) and returning a bool or a number in [0, 1]. lm-evaluation-harness tasks score themselves
(workflow.harness).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workflow.chat import prompt_text

END_THINK, START_THINK = "</think>", "<think>"
TRAILING_PUNCTUATION = ".,;:!?。"
_GROUPED = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?=\b|\.)")
_TRAILING_ZEROS = re.compile(r"(?<![\d.])(\d+)\.(\d*?)0+(?!\d|\.\d)")


class MetricError(ValueError):
    """An evaluate.metric setting that cannot score: the message names the key."""


def normalise(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation, numbers without thousands separators or a zero fraction."""
    text = " ".join(text.lower().split()).rstrip(TRAILING_PUNCTUATION + " ")
    text = _GROUPED.sub(lambda m: m.group(0).replace(",", ""), text)
    return _TRAILING_ZEROS.sub(lambda m: m[1] + (f".{m[2]}" if m[2] else ""), text)


def final_answer(text: str, opens_think: bool) -> str | None:
    """The text after the last </think>; the whole text when the model does not think; None when its thinking never
    ended (the prompt opened a think block, or the model did, and no </think> followed)."""
    if END_THINK in text:
        return text.rsplit(END_THINK, 1)[1].strip()
    if opens_think or START_THINK in text:
        return None
    return text.strip()


def exact(answer: str, reference: str) -> float:
    return float(normalise(answer) == normalise(reference))


def contains(answer: str, reference: str) -> float:
    """The normalised reference appears in the normalised answer as whole words ("5" is not in "15")."""
    needle = normalise(reference)
    return float(bool(needle) and re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", normalise(answer)) is not None)


def regex(pattern: re.Pattern) -> Callable[[str, str], float]:
    """The pattern's first capture group in the answer's first match, against the same group in the reference (or
    the whole reference when the pattern does not match it), both normalised."""
    def extracted(text: str) -> str | None:
        match = pattern.search(text)
        return match.group(1) if match else None

    def scored(answer: str, reference: str) -> float:
        found = extracted(answer)
        expected = extracted(reference)
        return float(found is not None and normalise(found) == normalise(expected if expected is not None else reference))

    return scored


def compile_pattern(pattern: str | None) -> re.Pattern:
    """evaluate.pattern compiled; it must have a capture group."""
    if not pattern:
        raise MetricError("evaluate.pattern is required when evaluate.metric is regex (a regular expression with one "
                          r"capture group, e.g. 'answer is (-?[\d,.]+)')")
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise MetricError(f"evaluate.pattern {pattern!r} is not a regular expression: {err}") from None
    if compiled.groups < 1:
        raise MetricError(f"evaluate.pattern {pattern!r} has no capture group; wrap the answer part in (...)")
    return compiled


def load_scorer(spec: str | None, search_path: str | Path) -> Callable[[str, str], object]:
    """The user's scorer `module:function`, imported with search_path first on sys.path; it must take
    (answer, reference)."""
    if not spec or spec.count(":") != 1 or not all(part.strip() for part in spec.split(":")):
        raise MetricError(f"evaluate.scorer must be 'module:function' when evaluate.metric is scorer (got {spec!r})")
    module_name, function_name = spec.split(":")
    folder = str(Path(search_path).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 — any failure of the user's module is reported the same way
        raise MetricError(f"evaluate.scorer {spec!r}: cannot import module {module_name!r} from evaluate.scorer_path "
                          f"{folder}: {type(err).__name__}: {err}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise MetricError(f"evaluate.scorer {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                          f"function {function_name!r}")
    try:
        inspect.signature(function).bind("answer", "reference")
    except TypeError:
        raise MetricError(f"evaluate.scorer {spec!r}: {function_name}{inspect.signature(function)} cannot be called as "
                          f"{function_name}(answer, reference); it must take the answer and the reference answer") from None
    except ValueError:  # builtins without a signature: trust them
        pass
    return function


def checked_score(spec: str, value: object) -> float:
    """A scorer's return value as a number in [0, 1]."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float) or not 0 <= value <= 1 or math.isnan(value):
        raise MetricError(f"evaluate.scorer {spec!r} returned {value!r}; it must return a bool or a number in [0, 1]")
    return float(value)


def metric_function(cfg) -> Callable[[str, str], float]:
    """The per-answer scoring function evaluate.metric names (cfg: EvalConfig); MetricError names a bad setting."""
    if cfg.metric == "exact":
        return exact
    if cfg.metric == "contains":
        return contains
    if cfg.metric == "regex":
        return regex(compile_pattern(cfg.pattern))
    if cfg.metric == "scorer":
        function = load_scorer(cfg.scorer, cfg.scorer_path)
        return lambda answer, reference: checked_score(cfg.scorer, function(answer, reference))
    raise MetricError(f"evaluate.metric {cfg.metric!r} does not score single answers (lm_eval tasks score themselves)")


def label(cfg) -> str:
    """The metric's name as reports and gate messages show it."""
    if cfg.metric == "regex":
        return f"regex {cfg.pattern!r} accuracy"
    if cfg.metric == "scorer":
        return f"scorer {cfg.scorer} mean score"
    if cfg.metric == "lm_eval":
        return f"lm_eval {cfg.lm_eval.task} {cfg.lm_eval.metric}"
    return f"{cfg.metric} accuracy"


def prompt_opens_think(tokenizer, messages: list[dict]) -> bool:
    """Whether the model's generation prompt leaves a think block open (DeepSeek-R1 and its distills)."""
    return prompt_text(tokenizer, messages).rstrip().endswith(START_THINK)


@dataclass(frozen=True)
class Grader:
    """Scores generations for one model: the metric and whether its prompts open a think block."""

    metric: Callable[[str, str], float]
    label: str
    opens_think: bool

    def answer(self, text: str) -> str | None:
        return final_answer(text, self.opens_think)

    def score(self, answer: str | None, reference: str) -> float:
        return 0.0 if answer is None else self.metric(answer, reference)


def grader(cfg, tokenizer, rows: list[dict]) -> Grader:
    """The Grader of evaluate.metric for the model whose tokenizer renders rows' prompts."""
    opens = bool(rows) and prompt_opens_think(tokenizer, rows[0]["messages"][:-1])
    return Grader(metric_function(cfg), label(cfg), opens)


def metric_files(cfg) -> list[str]:
    """The files evaluate.metric reads beside the test split (the scorer's module, the lm_eval task folder's files),
    so that editing them reruns what they score."""
    if cfg.metric == "scorer":
        module = cfg.scorer.split(":")[0]
        folder = Path(cfg.scorer_path)
        candidates = [folder / (module.replace(".", "/") + ".py"), folder / module.replace(".", "/") / "__init__.py"]
        return [str(path) for path in candidates if path.is_file()][:1]
    if cfg.metric == "lm_eval":
        return sorted(str(path) for path in Path(cfg.lm_eval.include_path).rglob("*") if path.is_file())
    return []
