"""The OpenAI protocol as the gateway speaks it: request bodies, limits on them, and answers (JSON or SSE streams)
generated from a local engine's token steps."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, field_validator
from starlette.concurrency import run_in_threadpool

from workflow.engine.interface import GenerationRequest


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


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)
    # The schema's JSON types are the API's: false is not a temperature of 0, nor "5" a token count.
    model: str
    """The served model's id (GET /v1/models); another is a 404."""
    max_tokens: int | None = Field(None, ge=1)
    stream: StrictBool = False
    stream_options: dict | None = None
    # The two below are checked by check_sampling, whose messages say why; the schema says what passes.
    temperature: float | None = Field(None, json_schema_extra={"minimum": 0, "maximum": 0})
    """Greedy decoding only: 0 or absent."""
    n: int = Field(1, json_schema_extra={"enum": [1]})
    """One choice per request."""

    @field_validator("max_tokens", "temperature", "n", "max_completion_tokens", mode="before", check_fields=False)
    @classmethod
    def json_number(cls, value):
        """JSON numbers only: pydantic would read false, true and "5" as 0, 1 and 5 (an integral 2.0 is an integer,
        as in JSON Schema)."""
        if isinstance(value, bool | str):
            raise ValueError(f"expected a JSON number, got {json.dumps(value)}")  # noqa: TRY004 (pydantic reports ValueError)
        return value


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: Text


def upstream_body(req: Sampling, limits) -> dict:
    """What the gateway sends an upstream engine server: the request as the gateway parsed it (unknown fields such
    as ignore_eos, min_tokens or best_of are gone), with the gateway's token limit written in (its default when the
    client gave none)."""
    body = req.model_dump(exclude_none=True, exclude={"max_completion_tokens"})
    body["max_tokens"] = max_new_tokens(req, limits)
    return body


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
    if req.model != model_name:
        raise BadRequest(f"model {req.model!r} is not served here; GET /v1/models lists {model_name!r}", 404)
    if req.temperature not in (None, 0, 0.0):
        raise BadRequest(f"temperature {req.temperature} is not supported: this gateway decodes greedily (send 0 or omit it)")
    if req.n != 1:
        raise BadRequest(f"n = {req.n} is not supported: one choice per request")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


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
    content: str


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


def generation_request(req: Sampling, prompt_ids: list[int], max_new_tokens: int) -> GenerationRequest:
    """What the engine is asked for: the prompt, the token budget respond settled on, and the request's decoding
    settings (greedy only so far: check_sampling refuses the rest)."""
    return GenerationRequest(prompt_ids, max_new_tokens)


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


def whole_answer(kind: str, head: dict, text: str, finish: str, usage: Usage) -> ChatCompletion | TextCompletion:
    """A non-streamed answer; head holds id, created and model."""
    if kind == "chat":
        choice = ChatChoice(index=0, message=AssistantMessage(role="assistant", content=text), finish_reason=finish)
        return ChatCompletion(object="chat.completion", choices=[choice], usage=usage, **head)
    return TextCompletion(object="text_completion", choices=[TextChoice(index=0, text=text, finish_reason=finish, logprobs=None)],
                          usage=usage, **head)


def chunk(kind: str, head: dict, delta: str | None, finish: str | None, first: bool, usage: Usage | None = None) -> str:
    """One server-sent event of a streamed answer: a delta, or (delta None) the closing usage. Fields left unset are
    not sent: the role in the first chat chunk only, the usage in the last."""
    head = head | ({"usage": usage} if usage is not None else {})
    if kind == "chat":
        choices = [] if delta is None else [ChatChunkChoice(index=0, finish_reason=finish, delta=ChatDelta(
            content=delta, **({"role": "assistant"} if first else {})))]
        event = ChatCompletionChunk(object="chat.completion.chunk", choices=choices, **head)
    else:
        choices = [] if delta is None else [TextChunkChoice(index=0, text=delta, finish_reason=finish, logprobs=None)]
        event = TextCompletionChunk(object="text_completion", choices=choices, **head)
    return sse(event.model_dump(mode="json", exclude_unset=True))


async def respond(req: Sampling, kind: str, prompt_ids: list[int], context_length: int,
                  generate: callable, state: dict, settings):
    """The answer to a chat ("chat") or text ("text") request from a local engine: `generate(GenerationRequest)`
    yields (text delta, finish reason or None, tokens so far). The prompt and the token budget are checked against
    the gateway's limits and the model's context length first; state gets the token counts for the audit log."""
    limit = token_budget(req, prompt_ids, context_length, settings.limits)
    state["prompt_tokens"] = len(prompt_ids)
    request_id = state["request_id"] = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": request_id, "created": int(time.time()), "model": settings.model_name}

    def usage() -> Usage:
        done = state.get("completion_tokens", 0)
        return Usage(prompt_tokens=len(prompt_ids), completion_tokens=done, total_tokens=len(prompt_ids) + done)

    def steps() -> Iterator[tuple[str, str | None]]:
        for delta, finish, count in generate(generation_request(req, prompt_ids, limit)):
            state["completion_tokens"] = count
            yield delta, finish

    if not req.stream:
        def whole() -> ChatCompletion | TextCompletion:
            parts, finish = [], None
            for delta, finish in steps():
                parts.append(delta)
            text = "".join(parts)
            if settings.audit.log_text:
                state["text"] = {"prompt_tokens": prompt_ids, "output": text}
            return whole_answer(kind, head, text, finish, usage())
        return await run_in_threadpool(whole)

    include_usage = bool((req.stream_options or {}).get("include_usage"))

    def events():
        for step, (delta, finish) in enumerate(steps()):
            yield chunk(kind, head, delta, finish, first=step == 0)
        if include_usage:
            yield chunk(kind, head, None, None, first=False, usage=usage())
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
