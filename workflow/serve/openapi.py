"""The gateway's API as its OpenAPI document declares it: the answers of the gateway's own routes (probes,
deployment, admin, audit), what each refusal means, the API-key scheme, and the document itself. The OpenAI bodies
and the error body are in protocol.py, next to the code that writes them; tests/test_fuzz.py holds the gateway to
this document."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model

from workflow.serve.protocol import ChatCompletionChunk, ErrorBody, TextCompletionChunk
from workflow.serve.settings import Limits

# What each refusal means, for the OpenAPI document; the body is always an ErrorBody.
REFUSALS = {
    400: "A malformed or unsupported request (the message names the field), or a malformed X-Forwarded-For "
         "from a trusted proxy",
    401: "No API key, or an unknown, revoked or expired one",
    403: "The key may not call this endpoint, or the client address is not on its role's allow-list",
    404: "The model named is not served here",
    408: "The request was not read within the gateway's deadline",
    409: "The request does not fit the gateway's state (e.g. undeploying a package that is not served)",
    413: "The body is over limits.max_body_bytes",
    429: "Too many requests for this key, or too many refused requests from this address; retry after Retry-After",
    502: "The upstream engine server answered with something that is not the OpenAI API's JSON, or not at all",
    503: "No model is loaded (loading, undeployed, or the load failed), or the audit log cannot be written",
}
# Any request may be refused before it reaches its route: by the guard (body limit, read deadline, rate limit,
# X-Forwarded-For), when its audit record cannot be written (503: nothing is served unaudited) and, for routes behind a
# key, by the access checks.
GUARDED = (400, 408, 413, 429, 503)
KEYED = GUARDED + (401, 403)


def refusals(*statuses: int) -> dict:
    """FastAPI `responses` for these refusals, each with the ErrorBody schema."""
    return {status: {"model": ErrorBody, "description": REFUSALS[status]} for status in sorted(statuses)}


CHUNKS = (ChatCompletionChunk, TextCompletionChunk)


def answers(model: type[BaseModel], chunk: type[BaseModel] | None = None) -> dict:
    """FastAPI `responses` for a 200 answer: the model as JSON and, for `stream: true`, server-sent events whose data
    is a `chunk` (JSON) or the closing [DONE]. FastAPI does not collect `chunk`: chunk_schemas adds it to the document."""
    content = {}
    if chunk:
        data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json",
                                                  "contentSchema": {"$ref": f"#/components/schemas/{chunk.__name__}"}}]}
        content["text/event-stream"] = {"itemSchema": {"type": "object", "required": ["data"], "properties": {"data": data}}}
    return {200: {"model": model, "content": content}}


def chunk_schemas() -> dict:
    """The OpenAPI components for the streamed chunks (and the models they use)."""
    components = {}
    for chunk in CHUNKS:
        schema = chunk.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        components.update(schema.pop("$defs", {}))
        components[chunk.__name__] = schema
    return components


def _no_default(schema: dict) -> None:
    schema.pop("default", None)  # absent means unchanged; null is not a value the body may hold


LimitsChange = create_model(
    "LimitsChange", __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="Some of the limits, each changed to the value given (all or none are applied).",
    **{name: (Annotated[field.annotation, *field.metadata], Field(None, description=field.description, json_schema_extra=_no_default))
       for name, field in Limits.model_fields.items()},
)


# The gateway's own answers: declared for the OpenAPI document, and what the routes build their answers from.
class Alive(BaseModel):
    status: Literal["alive"]


class Ready(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ready"]


class NotReadyAnswer(BaseModel):
    status: Literal["not ready"]
    reason: str
    """The kind of a load failure only (never its text), or "loading"."""


class Deployment(BaseModel):
    model: str
    backend: Literal["in_process", "upstream"]
    ready: bool
    package: dict
    limits: Limits


class Loading(BaseModel):
    status: Literal["loading"]
    package_sha256: str


class Pruned(BaseModel):
    pruned: int
    """Records older than the retention period dropped (a chained audit.prune event records it)."""
    retention_days: int


class Undeployed(BaseModel):
    status: Literal["undeployed"]


class AuditRecord(BaseModel):
    """One audit record; request records also carry method, endpoint, status, key_id, role, client_ip, latency and
    token counts."""

    model_config = ConfigDict(extra="allow")  # every field the record holds is answered, declared or not

    seq: int
    time: str
    prev: str
    hash: str


class AuditEvents(BaseModel):
    events: list[AuditRecord]
    head: str
    """The chain's newest hash, to keep outside the gateway (`audit verify --expect-head`)."""


class Alert(BaseModel):
    model_config = ConfigDict(extra="allow")  # every field an alert holds is answered, declared or not

    kind: Literal["outside_allow_list", "denied_burst", "audit_write_failed"]
    time: str
    client_ip: str | None = None
    key_id: str | None = None
    """outside_allow_list: the key that called."""
    endpoint: str | None = None
    """outside_allow_list: what it called."""
    count: int | None = None
    """denied_burst: denied requests within window_s."""
    window_s: float | None = None
    error: str | None = None
    """audit_write_failed: why the audit record could not be written."""


class AuditAlerts(BaseModel):
    alerts: list[Alert]


# Declares the API-key scheme in the OpenAPI document; the key itself is checked by Gateway.require.
api_key = HTTPBearer(auto_error=False, scheme_name="apiKey", description="An API key from `python -m workflow.serve keys add`")


def document(app: FastAPI, model_name: str) -> dict:
    """The app's OpenAPI document (not served: tests/test_fuzz.py fuzzes the gateway against it). It names the one
    model served. FastAPI documents a 422 for every route with a body or parameters; this gateway answers invalid
    input with a 400 and an ErrorBody."""
    if app.openapi_schema is None:
        written = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for request in ("ChatRequest", "CompletionRequest"):
            written["components"]["schemas"][request]["properties"]["model"]["enum"] = [model_name]
        for operation in (operation for item in written["paths"].values() for operation in item.values()):
            operation["responses"].pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            written["components"]["schemas"].pop(unused)
        written["components"]["schemas"].update(chunk_schemas())
        app.openapi_schema = written
    return app.openapi_schema
