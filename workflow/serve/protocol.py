"""The OpenAI protocol as the gateway speaks it: request bodies, limits on them, and answers (JSON or SSE streams)
generated from a local engine's token steps."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any, ClassVar, Literal

from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, field_validator
from starlette.concurrency import run_in_threadpool

from workflow.engine.interface import GenerationRequest
from workflow.engine.sampling import SamplingParams
from workflow.serve.output import ReasoningSplit, StopStrings

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request the gateway will not run; the message says what to change."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def encodable(text: str) -> str:
    """JSON can carry lone UTF-16 surrogates (\\ud800) that no tokenizer can encode: a 400, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text holds a lone surrogate at character {err.start}; send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(encodable)]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text
    reasoning_content: Text | None = None
    """An earlier assistant turn's reasoning, for templates that render it (most drop it from history)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    include_usage: StrictBool | None = None
    """A last chunk with the usage and no choices, as OpenAI sends it."""
    include_obfuscation: StrictBool | None = None
    """OpenAI pads chunks against length side channels; this gateway does not: false or absent only."""


Stop = Annotated[Text, Field(min_length=1)]
TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]
Bias = Annotated[StrictFloat, Field(ge=-100, le=100)]
JSON_NUMBERS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "n", "presence_penalty",
                "frequency_penalty", "top_logprobs", "best_of")


class Sampling(BaseModel):
    """What chat and text completions share. Fields OpenAI defines that the gateway does not serve are declared too
    and refused with a 400 naming them unless they hold their no-effect value (REFUSED); fields OpenAI does not
    define are ignored, as vLLM does, and logged (`unknown_fields`), never forwarded upstream."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)
    # The schema's JSON types are the API's: false is not a temperature of 0, nor "5" a token count.
    model: str
    """The served model's id (GET /v1/models); another is a 404."""
    max_tokens: int | None = Field(None, ge=1)
    """Most tokens to generate (the gateway's limits.max_tokens caps it and is the default)."""
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    """Only with stream: true."""
    temperature: float | None = Field(None, ge=0, le=2)
    """0 decodes greedily; absent takes the model's generation_config.json (greedy when it does not sample)."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Nucleus sampling; absent takes the model's generation_config.json, else 1."""
    top_k: int | None = Field(None, ge=-1)
    """Sample from the k most likely tokens (0 or -1: all), as vLLM takes it; absent takes generation_config.json."""
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    """The same seed, prompt and settings give the same answer (on the same engine)."""
    stop: Stop | Annotated[list[Stop], Field(min_length=1, max_length=4)] | None = None
    """Up to 4 strings; the answer ends before the first one generated (finish_reason "stop")."""
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: Annotated[dict[TokenId, Bias], Field(max_length=300, json_schema_extra={"additionalProperties": False})] | None = None
    """Token id (as a string) -> bias added to its logit, -100 to 100."""
    n: int = Field(1, json_schema_extra={"enum": [1]})
    """One choice per request (n > 1 is a 400)."""
    user: str | None = None
    """Accepted; it does not change the answer (the audit log names the API key instead)."""

    REFUSED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {
        "n": (lambda v: v == 1, "one choice per request: send n = 1 or leave it out, and repeat the request for more"),
        "stream_options": (lambda v: not (v.include_obfuscation), "stream obfuscation is not served: leave include_obfuscation out"),
    }

    @field_validator(*JSON_NUMBERS, mode="before", check_fields=False)
    @classmethod
    def json_number(cls, value):
        """JSON numbers only: pydantic would read false, true and "5" as 0, 1 and 5 (an integral 2.0 is an integer,
        as in JSON Schema)."""
        if isinstance(value, bool | str):
            raise ValueError(f"expected a JSON number, got {json.dumps(value)}")  # noqa: TRY004 (pydantic reports ValueError)
        return value

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


def _absent(value) -> bool:
    return value in (None, False, "", [], {})


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens (it wins when both are given)."""
    logprobs: StrictBool | None = None
    """Not served: false or absent."""
    top_logprobs: int | None = Field(None, ge=0, le=20)
    """Not served: 0 or absent."""
    response_format: dict | None = None
    """{"type": "text"} only: no JSON mode or schema-constrained decoding."""
    tools: list[dict] | None = None
    """Not served: no tool calling (absent or empty)."""
    tool_choice: str | dict | None = None
    """"none" or "auto" (no tools, so no calls) only."""
    parallel_tool_calls: StrictBool | None = None
    """Accepted; without tools it has no effect."""
    functions: list[dict] | None = None
    """Not served (the deprecated form of tools)."""
    function_call: str | dict | None = None
    """"none" or "auto" only (the deprecated form of tool_choice)."""
    reasoning_effort: str | None = None
    """Not served: the model thinks as its chat template makes it."""
    verbosity: str | None = None
    """Not served."""
    modalities: list[str] | None = None
    """["text"] only."""
    audio: dict | None = None
    """Not served: text only."""
    prediction: dict | None = None
    """Not served (predicted outputs)."""
    web_search_options: dict | None = None
    """Not served: nothing leaves the gateway."""
    store: StrictBool | None = None
    """Not served: answers are not stored (false or absent)."""
    metadata: dict[str, str] | None = None
    """Accepted; used with store only, so it has no effect."""
    service_tier: str | None = None
    """"auto" or "default" only: one tier."""
    safety_identifier: str | None = None
    """Accepted; it does not change the answer."""
    prompt_cache_key: str | None = None
    """Accepted; it does not change the answer."""

    REFUSED: ClassVar[dict] = Sampling.REFUSED | {
        "logprobs": (_absent, "log probabilities are not served: send false or leave it out"),
        "top_logprobs": (_absent, "log probabilities are not served: send 0 or leave it out"),
        "response_format": (lambda v: v in (None, {"type": "text"}), "only {\"type\": \"text\"}: no JSON mode or structured outputs"),
        "tools": (_absent, "tool calling is not served"),
        "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calling is not served: send none or auto"),
        "functions": (_absent, "function calling is not served"),
        "function_call": (lambda v: v in (None, "none", "auto"), "function calling is not served: send none or auto"),
        "reasoning_effort": (_absent, "the model thinks as its chat template makes it; leave reasoning_effort out"),
        "verbosity": (_absent, "not served; leave it out"),
        "modalities": (lambda v: v in (None, ["text"]), "text only: send [\"text\"] or leave it out"),
        "audio": (_absent, "text only"),
        "prediction": (_absent, "predicted outputs are not served"),
        "web_search_options": (_absent, "web search is not served"),
        "store": (_absent, "answers are not stored: send false or leave it out"),
        "service_tier": (lambda v: v in (None, "auto", "default"), "one service tier: send auto or default"),
    }


class CompletionRequest(Sampling):
    prompt: Text
    logprobs: int | None = Field(None, ge=0, le=5)
    """Not served: absent or null."""
    echo: StrictBool | None = None
    """Not served: false or absent."""
    suffix: str | None = None
    """Not served (insertion): absent or empty."""
    best_of: int | None = Field(None, ge=1)
    """1 or absent."""

    @field_validator("logprobs", mode="before")
    @classmethod
    def json_count(cls, value):
        return Sampling.json_number(value)

    REFUSED: ClassVar[dict] = Sampling.REFUSED | {
        "logprobs": (lambda v: v is None, "log probabilities are not served: leave logprobs out"),
        "echo": (_absent, "echo is not served: send false or leave it out"),
        "suffix": (_absent, "suffix (insertion) is not served"),
        "best_of": (lambda v: v in (None, 1), "one candidate per request: send best_of 1 or leave it out"),
    }


SERVED = ("max_tokens", "stream", "stream_options", "temperature", "top_p", "top_k", "seed", "stop", "presence_penalty",
          "frequency_penalty", "logit_bias")
"""The fields that change what is generated: sent on to an upstream engine server (with model, messages or prompt)."""


def upstream_body(req: Sampling, limits) -> dict:
    """What the gateway sends an upstream engine server: the validated request's served fields (fields OpenAI does
    not define, such as ignore_eos, min_tokens or best_of on chat, are gone, and refused ones never get here), with the
    gateway's token limit written in (its default when the client gave none)."""
    keep = {"model", "messages", "prompt", *SERVED}
    body = req.model_dump(exclude_none=True, include=keep & set(type(req).model_fields))
    body["max_tokens"] = max_new_tokens(req, limits)
    return body


def stops(req: Sampling) -> tuple[str, ...]:
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())


def sampling_params(req: Sampling, defaults: dict, vocab_size: int) -> SamplingParams:
    """The engine's sampling parameters: the request's, else the model's defaults (generation_config.json), else greedy."""
    def pick(name: str, fallback):
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, fallback)

    bias = {int(token): value for token, value in (req.logit_bias or {}).items()}
    outside = sorted(token for token in bias if token >= vocab_size)
    if outside:
        raise BadRequest(f"logit_bias names token ids outside the vocabulary (0..{vocab_size - 1}): {outside[:5]}")
    return SamplingParams(temperature=pick("temperature", 0.0), top_p=pick("top_p", 1.0), top_k=max(pick("top_k", 0), 0),
                          seed=req.seed, presence_penalty=req.presence_penalty or 0.0,
                          frequency_penalty=req.frequency_penalty or 0.0,
                          repetition_penalty=defaults.get("repetition_penalty", 1.0), logit_bias=bias)


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    """A refusal's body, as ErrorBody declares it."""
    return ErrorBody(error=ErrorDetail(message=message, type=kind, code=code)).model_dump()


class ErrorDetail(BaseModel):
    message: str
    """What was wrong and what to do."""
    type: str
    """invalid_request_error (the client's to fix), service_unavailable or upstream_error (the engine server failed)."""
    code: str | None = None
    """Why a request was refused, for refusals by the gateway's guard or access checks (no_key, role_forbidden, ...)."""


class ErrorBody(BaseModel):
    """Every refusal's body (OpenAI's error shape), as error_body writes it."""

    error: ErrorDetail


def max_new_tokens(req: Sampling, limits) -> int:
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked and asked > limits.max_tokens:
        raise BadRequest(f"max_tokens {asked} is over the gateway's limit of {limits.max_tokens}")
    return asked or limits.max_tokens


def check_sampling(req: Sampling, model_name: str) -> None:
    """Refuse what the gateway does not serve, naming the field; log the fields OpenAI does not define (ignored)."""
    if req.model != model_name:
        raise BadRequest(f"model {req.model!r} is not served here; GET /v1/models lists {model_name!r}", 404)
    for name, (allowed, why) in type(req).REFUSED.items():
        value = getattr(req, name)
        if value is not None and not allowed(value):
            shown = json.dumps(value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value)
            raise BadRequest(f"{name} = {shown if len(shown) <= 60 else shown[:57] + '...'} is not supported: {why}")
    if req.stream_options is not None and not req.stream:
        raise BadRequest("stream_options is only allowed with stream: true")
    if req.unknown_fields():
        log.warning("ignored request fields the OpenAI API does not define: %s", ", ".join(req.unknown_fields()))


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    """The answer; null when a think block took the whole generation (finish_reason says why)."""
    reasoning_content: str | None = None
    """A thinking model's reasoning (its think block), as DeepSeek's API and vLLM give it; absent for other models
    and with rollout.gateway.reasoning: raw (the think block stays in content)."""


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """A non-streamed chat answer (`stream: true` answers text/event-stream chunks instead)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class TextCompletion(BaseModel):
    """A non-streamed text answer (`stream: true` answers text/event-stream chunks instead)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    package_sha256: str | None = None
    """The served package's digest (absent for a folder opened beforehand, or from an upstream engine)."""


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    """In the first chunk only."""
    content: str | None = None
    reasoning_content: str | None = None
    """A thinking model's reasoning, streamed before its content."""


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat answer; with stream_options.include_usage, a last one has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TextChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class TextCompletionChunk(BaseModel):
    """One event of a streamed text answer; with stream_options.include_usage, a last one has no choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChunkChoice]
    usage: Usage | None = None


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def token_budget(req: Sampling, prompt_ids: list[int], context_length: int, limits) -> int:
    """New tokens the request may have: its max_tokens (or the gateway's default, shrunk to what fits), checked
    against the gateway's limits and the model's context length."""
    limit = max_new_tokens(req, limits)
    if not prompt_ids:  # engines refuse an empty input (ONNX Runtime GenAI: "input_ids is empty")
        raise BadRequest("the prompt is empty (0 tokens); send some text")
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise BadRequest(f"prompt is {len(prompt_ids)} tokens, over the gateway's limit of {limits.max_prompt_tokens}")
    room = context_length - len(prompt_ids)
    if limit > room:
        if req.max_tokens or getattr(req, "max_completion_tokens", None):
            raise BadRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({limit}) is over the model's context "
                             f"length of {context_length}; ask for at most {max(room, 0)}")
        limit = room  # the default limit shrinks to what fits
    if limit < 1:
        raise BadRequest(f"prompt ({len(prompt_ids)} tokens) fills the model's context length of {context_length}")
    return limit


def cut_at_stops(steps: Iterator[tuple[str, str | None, int]], stop: tuple[str, ...], state: dict) -> Iterator[tuple[str, str | None]]:
    """(text delta, finish reason or None) of an engine's steps, ending before the first stop string ("stop"); the
    engine's generation is closed there, which frees its batch slot."""
    cut = StopStrings(stop)
    try:
        for delta, finish, count in steps:
            state["completion_tokens"] = count
            text = cut.feed(delta)
            if cut.hit:
                yield text, "stop"
                return
            if finish:
                yield text + cut.flush(), finish
                return
            yield text, None
    finally:
        steps.close()


class Answer:
    """One request's answer, built from the response models declared for the OpenAPI document: a chat message (with
    reasoning_content split off when `split` is given) or a text choice, whole or as stream chunks."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, state: dict, split: ReasoningSplit | None) -> None:
        self.kind, self.prompt_tokens, self.state, self.split = kind, prompt_tokens, state, split
        request_id = state["request_id"] = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.head = {"id": request_id, "created": int(time.time()), "model": model}

    def fields(self, delta: str, finish: str | None) -> dict:
        """What a text delta adds: {"content"} or {"reasoning_content", "content"} (chat), {"text"} (text); empty
        parts left out."""
        if self.kind == "text":
            return {"text": delta}
        if self.split is None:
            return {"content": delta}
        reasoning, answer = self.split.feed(delta)
        if finish:
            more = self.split.finish()
            reasoning, answer = reasoning + more[0], answer + more[1]
        return {key: value for key, value in (("reasoning_content", reasoning), ("content", answer)) if value}

    def usage(self) -> Usage:
        done = self.state.get("completion_tokens", 0)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done, total_tokens=self.prompt_tokens + done)

    def whole(self, pieces: Iterator[tuple[str, str | None]]) -> ChatCompletion | TextCompletion:
        reasoning, answer, finish = [], [], None
        for delta, finish in pieces:
            added = self.fields(delta, finish)
            reasoning.append(added.get("reasoning_content", ""))
            answer.append(added.get("content", added.get("text", "")))
        text = "".join(answer)
        if self.kind == "text":
            return TextCompletion(object="text_completion", usage=self.usage(), **self.head,
                                  choices=[TextChoice(index=0, text=text, finish_reason=finish, logprobs=None)])
        message = self.split.message("".join(reasoning), text) if self.split else {"content": text}
        choice = ChatChoice(index=0, message=AssistantMessage(role="assistant", **message), finish_reason=finish)
        return ChatCompletion(object="chat.completion", choices=[choice], usage=self.usage(), **self.head)

    def chunk(self, delta: dict | None, finish: str | None = None) -> str:
        """One server-sent event: a choice with this delta, or (delta None) the usage and no choices. Fields left
        unset are not sent: the role in the first chat chunk only, the usage in the last."""
        head = self.head | ({"usage": self.usage()} if delta is None else {})
        if self.kind == "chat":
            choices = [] if delta is None else [ChatChunkChoice(index=0, delta=ChatDelta(**delta), finish_reason=finish)]
            event = ChatCompletionChunk(object="chat.completion.chunk", choices=choices, **head)
        else:
            choices = [] if delta is None else [TextChunkChoice(index=0, text=delta.get("text", ""), finish_reason=finish, logprobs=None)]
            event = TextCompletionChunk(object="text_completion", choices=choices, **head)
        return sse(event.model_dump(mode="json", exclude_unset=True))

    def events(self, pieces: Iterator[tuple[str, str | None]], include_usage: bool) -> Iterator[str]:
        if self.kind == "chat":
            yield self.chunk({"role": "assistant", "content": ""})  # OpenAI sends the role in the first chunk only
        for delta, finish in pieces:
            added = self.fields(delta, finish)
            if added or finish:
                yield self.chunk(added, finish)
        if include_usage:
            yield self.chunk(None)
        yield sse("[DONE]")


async def respond(req: Sampling, kind: str, prompt_ids: list[int], context_length: int, generate: Callable,
                  state: dict, settings, sampling: SamplingParams, opens_think: bool | None = None):
    """The answer to a chat ("chat") or text ("text") request from a local engine: `generate(GenerationRequest)`
    yields (text delta, finish reason or None, tokens so far). The prompt and the token budget are checked first; the
    text ends before a stop string; with `opens_think` (True: the prompt opened a think block, False: the model may
    open one) a chat answer's reasoning goes to reasoning_content. state gets the token counts for the audit log."""
    limit = token_budget(req, prompt_ids, context_length, settings.limits)
    state["prompt_tokens"] = len(prompt_ids)
    split = ReasoningSplit(opens_think) if kind == "chat" and opens_think is not None else None
    answer = Answer(kind, settings.model_name, len(prompt_ids), state, split)
    pieces = cut_at_stops(generate(GenerationRequest(prompt_ids, limit, sampling=sampling)), stops(req), state)
    if not req.stream:
        whole = await run_in_threadpool(answer.whole, pieces)
        if settings.audit.log_text:
            said = whole.choices[0]
            state["text"] = {"prompt_tokens": prompt_ids, "output": said.text if kind == "text" else said.message.content}
            if kind == "chat" and said.message.reasoning_content is not None:
                state["text"]["reasoning"] = said.message.reasoning_content
        return whole
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(answer.events(pieces, include_usage), media_type="text/event-stream")
