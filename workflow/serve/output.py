"""The generated text as clients get it, piece by piece while it streams: cut at a stop string, and split into
reasoning and answer.

Both work on text deltas and hold back only what may still turn out to be a stop string or a think tag, so a
streamed answer is, joined, exactly the plain one (the plain answer runs through the same code).

Reasoning follows vLLM's deepseek_r1 parser (vllm/reasoning/deepseek_r1_reasoning_parser.py) and DeepSeek's API
(`reasoning_content` beside `content`): a generation that starts inside a think block (the chat template's generation
prompt ends in `<think>`, as DeepSeek-R1's does, so the model writes `</think>` but no opening tag) or that opens one
itself (`<think>` first) is reasoning up to `</think>`, and the answer after it. A think block that never closes (the
token limit reached while thinking) is all reasoning and no answer: `content` is null, and finish_reason says why
("length"). A generation that does not start with a think block is all answer.
"""

from __future__ import annotations

from workflow.chat import END_THINK, THINK


def _held_prefix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `tags` (it may still become one)."""
    longest = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:size]):
                longest = size
                break
    return longest


class StopStrings:
    """Cuts the text before the first of the stop strings (which is not sent), as OpenAI's `stop` does."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, delta: str) -> str:
        """What may be sent now; after a stop string, `hit` is set and nothing more is."""
        if self.hit:
            return ""
        text = self.held + delta
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.hit, self.held = True, ""
            return text[:min(found)]
        keep = _held_prefix(text, self.stops)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The text held back when the generation ended without a stop string."""
        held, self.held = self.held, ""
        return held


class ReasoningSplit:
    """Splits a chat generation into (reasoning, answer) deltas."""

    def __init__(self, prompt_opens_think: bool) -> None:
        self.state = "reasoning" if prompt_opens_think else "start"
        self.held = ""
        self.thought = prompt_opens_think
        """Whether the generation has a think block (then an empty answer is null, as vLLM's parser gives it)."""
        self.reasoning_started = self.answer_started = False

    @staticmethod
    def opens_think(prompt_text: str) -> bool:
        return prompt_text.rstrip().endswith(THINK)

    def feed(self, delta: str) -> tuple[str, str]:
        self.held += delta
        reasoning = answer = ""
        if self.state == "start":
            self._start()
        if self.state == "reasoning":
            reasoning = self._reasoning()
        if self.state == "answer":
            answer = self._answer()
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """What was held back, at the end of the generation: a partial tag is text after all."""
        if self.state == "start":
            self.state = "answer"
            return "", self._answer()
        if self.state == "reasoning":
            reasoning = self.held if self.reasoning_started else self.held.lstrip()
            self.held = ""
            return reasoning.rstrip(), ""
        return "", ""

    def _start(self) -> None:
        text = self.held.lstrip()
        if text.startswith(THINK):
            self.state, self.held, self.thought = "reasoning", text[len(THINK):], True
        elif not THINK.startswith(text):  # neither a think tag nor the beginning of one: plain answer
            self.state, self.answer_started = "answer", bool(self.held)

    def _reasoning(self) -> str:
        """Reasoning that may be sent: not a possible beginning of `</think>`, nor trailing whitespace (dropped before
        the tag), nor leading whitespace (the newline after `<think>`)."""
        if not self.reasoning_started:
            self.held = self.held.lstrip()
        text, closed, rest = self.held.partition(END_THINK)
        if closed:
            self.state, self.held = "answer", rest
            out = text.rstrip()
            self.reasoning_started |= bool(out)
            return out
        keep = _held_prefix(text, (END_THINK,))
        sendable = text[:len(text) - keep]
        out = sendable.rstrip()
        self.held = sendable[len(out):] + text[len(text) - keep:]
        self.reasoning_started |= bool(out)
        return out

    def _answer(self) -> str:
        if self.thought and not self.answer_started:
            self.held = self.held.lstrip()  # the blank line after </think>
        out, self.held = self.held, ""
        self.answer_started |= bool(out)
        return out

    def message(self, reasoning: str, answer: str) -> dict:
        """The whole answer's fields: reasoning_content only when there was a think block; content null when it
        never closed or nothing followed it."""
        if not self.thought:
            return {"content": answer}
        return {"reasoning_content": reasoning, "content": answer or None}


def split_text(text: str, prompt_opens_think: bool) -> dict:
    """A whole generation's message fields as the gateway answers them with reasoning: split (the canary's
    reference for what the engine generated)."""
    split = ReasoningSplit(prompt_opens_think)
    reasoning, answer = split.feed(text)
    more = split.finish()
    return split.message(reasoning + more[0], answer + more[1])
