"""Chat formats: the prompt a served model receives, and the training example that ends in what it must generate.

    from workflow.chat import ChatFormat, prompt_ids
    fmt = ChatFormat.probe(tokenizer, chat_template="auto", reasoning_turns="last", source="/models/r1-distill")
    example = fmt.example(messages)   # input_ids, labels (-100 on the prompt), the served messages, the answer

Train the format the model is served with: the prompt part of every example is, token for token, what the model's own
chat template renders with add_generation_prompt=True, tokenized with no special tokens added (the templates write
BOS themselves), which is what the gateway, the engines' accuracy checks and evaluation send. The target after it is
the assistant turn as the model must generate it, written in one of three styles, chosen once per template by probing
it with a conversation that has reasoning:

- in_place: the template renders `reasoning_content` inside the turn (the bootstrap model's template; Qwen3's for
  the turn after the last user message);
- inline: the template knows nothing of reasoning and renders the content verbatim, so the reasoning goes into the
  content as `<think>\\n...\\n</think>\\n\\n` followed by the answer (Llama-3.x-Instruct, Qwen2.5-Instruct);
- think: the template drops reasoning by design (DeepSeek-R1 and its distills keep only the text after the last
  `</think>` and open the think block in the generation prompt): the target is built after the model's own prompt,
  `<think>\\n` (unless the prompt opened it) + reasoning + `\\n</think>\\n\\n` + answer + the end the template writes
  after an answer (`<｜end▁of▁sentence｜>`). A row without reasoning trains an empty think block.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import jinja2

THINK, END_THINK = "<think>", "</think>"
# Private-use characters: no template rewrites them and no dataset holds them.
SLOT = "\ue000ft2prod\ue001"
PROBE = [
    {"role": "user", "content": "ft2prod probe question"},
    {"role": "assistant", "reasoning_content": "ft2prod probe reasoning", "content": "ft2prod probe answer"},
]


class TemplateError(ValueError):
    """A chat template that cannot train this data the way it is served."""


class ThinkingOff(TemplateError):
    """The served prompt closes the think block (a template that serves with thinking off): answers train after
    it, reasoning cannot."""


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The served prompt: the model's own template with its generation prompt."""
    return _rendered(lambda: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _rendered(render) -> str:
    """A template's own refusal (Gemma's "System role not supported", role alternation checks) as a TemplateError."""
    try:
        return render()
    except jinja2.TemplateError as err:
        raise TemplateError(f"the chat template refuses the conversation: {err}") from None


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The served prompt's token ids (exactly one BOS where the template writes one)."""
    return tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False).input_ids


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a content string with an inline think block, or (None, text) without one.

    The reasoning is everything before the last `</think>` (a leading `<think>` removed), as R1-style generations
    and datasets write it, with or without the opening tag."""
    if END_THINK not in text:
        if THINK in text:
            raise ValueError(f"an unclosed {THINK} block (no {END_THINK})")
        return None, text
    head, _, answer = text.rpartition(END_THINK)
    reasoning = head.strip()
    if reasoning.startswith(THINK):
        reasoning = reasoning[len(THINK):].strip()
    if THINK in reasoning or END_THINK in reasoning:
        raise ValueError(f"more than one {THINK} block in one turn")
    return reasoning, answer.strip()


def inline(reasoning: str | None, answer: str) -> str:
    """An answer with its reasoning written inline, as reasoning datasets ship it."""
    return answer if reasoning is None else f"{THINK}\n{reasoning}\n{END_THINK}\n\n{answer}"


@dataclass(frozen=True)
class Example:
    messages: list[dict]
    """The conversation as a client sends it to the served model, ending with the trained assistant turn."""
    answer: str
    """The trained turn's answer (the text after its reasoning)."""
    input_ids: list[int]
    labels: list[int]
    """-100 on everything the model does not generate."""
    prompt_len: int
    """Tokens of the served prompt at the start of input_ids."""
    trained_turns: tuple[int, ...]
    """Indices of the assistant turns whose tokens are trained."""


@dataclass
class ChatFormat:
    tokenizer: object
    style: str
    reasoning_turns: str = "last"
    training_template: str | None = None
    """A user's training template (data.chat_template: path); None renders with the model's own."""
    source: str = ""

    @classmethod
    def probe(cls, tokenizer, chat_template: str = "auto", reasoning_turns: str = "last", source: str = "") -> ChatFormat:
        """The style that trains reasoning with this tokenizer's template (data.chat_template: auto | model | path)."""
        if tokenizer.chat_template is None:
            raise TemplateError(f"the tokenizer in {source} has no chat template; add one to its tokenizer_config.json")
        if chat_template not in ("auto", "model"):
            path = Path(chat_template)
            if not path.is_file():
                raise TemplateError(f"data.chat_template: {chat_template} is not a file (use auto, model or the path of a .jinja template)")
            fmt = cls(tokenizer, "in_place", reasoning_turns, path.read_text(encoding="utf-8"), str(path))
            try:
                fmt._check_probe()
            except TemplateError as err:
                raise TemplateError(f"data.chat_template: the training template {path} cannot be used: {err}") from None
            return fmt
        styles = ("in_place", "inline") if chat_template == "model" else ("in_place", "think", "inline")
        reasons = []
        for style in styles:
            if style == "think" and END_THINK not in tokenizer.chat_template:
                reasons.append("think: the template does not handle </think>")
                continue
            fmt = cls(tokenizer, style, reasoning_turns, None, source)
            try:
                fmt._check_probe()
                return fmt
            except TemplateError as err:
                reasons.append(f"{style}: {err}")
        hint = ("use data.chat_template: auto, which builds the training text for templates that drop reasoning"
                if chat_template == "model" else "pass a training template whose prompts equal the model's own with "
                "data.chat_template: /path/to/template.jinja")
        raise TemplateError(f"the chat template of {source} cannot be made to train reasoning ({'; '.join(reasons)}); {hint}")

    @property
    def template_sha256(self) -> str:
        return hashlib.sha256((self.training_template or self.tokenizer.chat_template).encode()).hexdigest()

    def _check_probe(self) -> None:
        try:
            self.target(self.served(PROBE), 1, reasoning="ft2prod probe reasoning", answer="ft2prod probe answer")
        except ThinkingOff:
            return  # the style fits the template; rows with reasoning are refused one by one, naming file and line
        except TemplateError:
            raise
        except Exception as err:  # a template that raises on the probe (jinja errors, its own raise_exception)
            raise TemplateError(f"it failed to render a user/assistant conversation ({type(err).__name__}: {err})") from None

    def served(self, messages: list[dict]) -> list[dict]:
        """The conversation as a client sends it: inline style writes reasoning into the content."""
        if self.style != "inline":
            return [dict(m) for m in messages]
        return [{"role": m["role"], "content": inline(m.get("reasoning_content"), m["content"])} for m in messages]

    def _render(self, messages: list[dict], generation_prompt: bool, template: str | None = None) -> str:
        return _rendered(lambda: self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template))

    def target(self, served: list[dict], i: int, reasoning: str | None, answer: str, prompt: str | None = None) -> str:
        """What the model must generate for assistant turn i after its served prompt (served[:i]; `prompt` when the
        caller rendered it already)."""
        prompt = prompt_text(self.tokenizer, served[:i]) if prompt is None else prompt
        if self.style == "think":
            with_slot = self._render(served[:i] + [{"role": "assistant", "content": SLOT}], False)
            before, found, after = with_slot.partition(SLOT)
            if not found or SLOT in after or not (prompt.startswith(before) or before.startswith(prompt)):
                raise TemplateError("the template's answer does not follow its generation prompt")
            if prompt.rstrip().endswith(END_THINK):  # e.g. Qwen3.5's small models: thinking off by default
                if reasoning:
                    raise ThinkingOff("its generation prompt closes the think block (the template serves with thinking "
                                      "off), so the reasoning would be trained where the served model never writes it")
                return answer + after
            opened = prompt.rstrip().endswith(THINK)
            return ("" if opened else f"{THINK}\n") + (reasoning or "").strip("\n") + f"\n{END_THINK}\n\n" + answer + after
        if self.training_template is not None:
            own_prompt = self._render(served[:i], True, self.training_template)
            if own_prompt != prompt:
                raise TemplateError("it renders the prompt differently from the model's own template (first difference "
                                    f"at character {_first_difference(own_prompt, prompt)})")
        full = self._render(served[: i + 1], False, self.training_template)
        if not full.startswith(prompt):
            raise TemplateError("the rendered conversation does not start with the generation prompt, so the "
                                "assistant turn cannot be located")
        text = full[len(prompt):]
        if answer.strip() not in text or (reasoning and reasoning.strip() not in text):
            raise TemplateError("it drops the turn's " + ("reasoning" if answer.strip() in text else "answer"))
        return text

    def example(self, messages: list[dict], upto: int | None = None) -> Example:
        """Training example for the assistant turn at index `upto` (default: the last message).

        reasoning_turns last: earlier assistant turns are trained too where the template renders them, in the
        conversation's history, exactly as the model would generate them (templates that strip reasoning from
        history, R1's and Qwen3's, leave them as context). all: callers make one example per assistant turn."""
        upto = len(messages) - 1 if upto is None else upto
        served = self.served(messages[: upto + 1])
        last = messages[upto]
        prompt = prompt_text(self.tokenizer, served[:upto])
        target = self.target(served, upto, last.get("reasoning_content"), last["content"], prompt)
        spans, trained = [], []
        if self.reasoning_turns == "last" and self.tokenizer.is_fast:
            for j, message in enumerate(messages[:upto]):
                if message["role"] != "assistant":
                    continue
                before = prompt_text(self.tokenizer, served[:j])
                try:
                    earlier = self.target(served, j, message.get("reasoning_content"), message["content"], before)
                except TemplateError:
                    continue
                if prompt.startswith(before) and prompt[len(before):].startswith(earlier):
                    spans.append((len(before), len(before) + len(earlier)))
                    trained.append(j)
        if spans:
            encoded = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            context, labels = encoded.input_ids, [
                token if any(a <= begin < b for a, b in spans) else -100
                for token, (begin, _) in zip(encoded.input_ids, encoded.offset_mapping, strict=True)]
        else:
            context = self.tokenizer(prompt, add_special_tokens=False).input_ids
            labels = [-100] * len(context)
        generated = self.tokenizer(target, add_special_tokens=False).input_ids
        return Example(served, last["content"], context + generated, labels + generated, len(context), (*trained, upto))


def _first_difference(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
