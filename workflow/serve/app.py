"""The gateway: an OpenAI-compatible API behind API keys, roles, IP allow-lists, limits and an audit log.

    python -m workflow.serve start --package results/package/model.ftpkg      # see README.md

| endpoint | permission | roles |
| --- | --- | --- |
| GET /healthz, /readyz | none (probes) | anyone |
| GET /v1/models, POST /v1/chat/completions, /v1/completions | infer | analyst |
| GET /v1/deployment | view | admin, analyst, auditor |
| POST /admin/deploy, /admin/undeploy | deploy | admin |
| GET, PUT /admin/limits | adjust | admin |
| GET /audit/events, /audit/alerts | audit | auditor |
| GET /metrics | monitor | auditor |
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from workflow.serve.access import Denied, KeyStore, client_ip
from workflow.serve.audit import AuditLog, alerts
from workflow.serve.backends import InProcess, NotReady, Upstream
from workflow.serve.settings import GatewaySettings


class BadRequest(ValueError):
    """A request the gateway will not run; the message says what to change."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str
    reasoning_content: str | None = None
    """An earlier assistant turn's reasoning, for templates that render it (most drop it from history)."""


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    temperature: float | None = None
    n: int = 1


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: str


class Deploy(BaseModel):
    package: str


class Undeploy(BaseModel):
    package_sha256: str
    """The digest of the package being served: undeploy says what it takes down."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ft2prod_gateway_requests", "Requests by endpoint, status and role",
                                ["endpoint", "status", "role"], registry=self.registry)
        self.latency = Histogram("ft2prod_gateway_request_seconds", "Request latency (to the last byte)", ["endpoint"],
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=self.registry)
        self.tokens = Counter("ft2prod_gateway_tokens", "Prompt and completion tokens", ["kind"], registry=self.registry)
        self.denied = Counter("ft2prod_gateway_denied", "Refused requests by reason", ["reason"], registry=self.registry)
        self.ready = Gauge("ft2prod_gateway_ready", "1 when a model is loaded and serving", registry=self.registry)
        self.in_flight = Gauge("ft2prod_gateway_in_flight", "Requests being served", registry=self.registry)


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


class Guard:
    """ASGI middleware around every HTTP request: client address, body-size limit, metrics and one audit record
    written when the last byte of the answer (streams included) has been sent."""

    def __init__(self, app, gateway: Gateway) -> None:
        self.app, self.gateway = app, gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        g, began = self.gateway, time.perf_counter()
        state = scope.setdefault("state", {})
        outcome = {"status": 500}
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        endpoint = scope["path"] if scope["path"] in g.paths else "other"
        g.metrics.in_flight.inc()
        try:
            state["client_ip"] = client_ip(scope["client"][0], headers.get("x-forwarded-for"), g.settings.policy.trusted_proxies)
            body = await self._bounded_body(receive, headers)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            async def watch(message):
                if message["type"] == "http.response.start":
                    outcome["status"] = message["status"]
                await send(message)

            await self.app(scope, replay, watch)
        except Denied as denied:
            state["reason"] = denied.reason
            outcome["status"] = denied.status
            await JSONResponse(error_body(str(denied), "invalid_request_error", denied.reason), denied.status)(scope, receive, send)
        finally:
            g.metrics.in_flight.dec()
            g.record(state, scope["method"], endpoint, outcome["status"], time.perf_counter() - began)

    async def _bounded_body(self, receive, headers: dict) -> bytes:
        limit = self.gateway.settings.limits.max_body_bytes
        if int(headers.get("content-length") or 0) > limit:
            raise Denied(413, "body_too_large", f"request body over limits.max_body_bytes = {limit}")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > limit:
                raise Denied(413, "body_too_large", f"request body over limits.max_body_bytes = {limit}")
            if not message.get("more_body"):
                return body


class Gateway:
    """The gateway's state: settings, keys, audit log, metrics and what it serves."""

    def __init__(self, settings: GatewaySettings, backend: InProcess | Upstream) -> None:
        self.settings, self.backend = settings, backend
        self.keys = KeyStore(settings.api_keys)
        self.audit = AuditLog(settings.audit_path, settings.retention_days)
        self.metrics = Metrics()
        self.paths: set[str] = set()

    def record(self, state: dict, method: str, endpoint: str, status: int, seconds: float) -> None:
        identity = state.get("identity")
        role = identity.role if identity else "none"
        event = {"event": "request", "method": method, "endpoint": endpoint, "status": status,
                 "key_id": identity.key_id if identity else None, "role": role, "client_ip": state.get("client_ip"),
                 "latency_ms": round(seconds * 1000, 1), "prompt_tokens": state.get("prompt_tokens", 0),
                 "completion_tokens": state.get("completion_tokens", 0)}
        for name in ("reason", "detail", "request_id"):
            if name in state:
                event[name] = state[name]
        if self.settings.log_text and "text" in state:
            event["text"] = state["text"]
        self.audit.append(event)
        self.metrics.requests.labels(endpoint, str(status), role).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        self.metrics.tokens.labels("prompt").inc(state.get("prompt_tokens", 0))
        self.metrics.tokens.labels("completion").inc(state.get("completion_tokens", 0))
        if status in (401, 403, 413) or "reason" in state:
            self.metrics.denied.labels(state.get("reason", str(status))).inc()

    def require(self, permission: str):
        def check(request: Request) -> None:
            state = request.scope["state"]
            identity = self.keys.identify(request.headers.get("authorization"))
            state["identity"] = identity
            self.settings.policy.authorize(identity, state["client_ip"], permission)

        return Depends(check)

    def ready(self) -> bool:
        return isinstance(self.backend, InProcess) and self.backend.ready()


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


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(gateway: Gateway, package: str | None = None, model_dir: str | None = None) -> FastAPI:
    """The app; an in-process gateway starts loading `package` (encrypted) or `model_dir` (already opened)."""
    settings, backend = gateway.settings, gateway.backend

    async def lifespan(app):
        if isinstance(backend, InProcess) and package:
            backend.load_in_background(backend.load, package, settings.trusted_signer(), settings.kms())
        elif isinstance(backend, InProcess) and model_dir:
            backend.load_in_background(backend.load_opened, model_dir)
        yield

    app = FastAPI(title="ft2prod gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest):
        request.scope["state"]["reason"] = "bad_request"
        return JSONResponse(error_body(str(err), "invalid_request_error"), err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        request.scope["state"]["reason"] = "bad_request"
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in err.errors())
        return JSONResponse(error_body(f"invalid request: {problems}", "invalid_request_error"), 400)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, err: NotReady):
        return JSONResponse(error_body(f"not ready: {err}", "service_unavailable"), 503)

    @app.exception_handler(Denied)
    async def denied(request: Request, err: Denied):
        request.scope["state"]["reason"] = err.reason
        return JSONResponse(error_body(str(err), "invalid_request_error", err.reason), err.status)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        ready = await backend.ready_async() if isinstance(backend, Upstream) else backend.ready()
        gateway.metrics.ready.set(int(ready))
        if ready:
            return {"status": "ready", "package": backend.package}
        reason = getattr(backend, "error", None) or "loading"
        return JSONResponse({"status": "not ready", "reason": reason}, 503)

    @app.get("/v1/models", dependencies=[gateway.require("infer")])
    async def models():
        if isinstance(backend, Upstream):
            return await backend.models()
        backend.current()
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "ft2prod",
                                            "package_sha256": backend.package.get("sha256")}]}

    async def forward(request: Request, path: str, req: Sampling):
        body = await request.json()
        status, answer = await backend.forward(path, body)
        state = request.scope["state"]
        if isinstance(answer, dict):
            usage = answer.get("usage") or {}
            state["prompt_tokens"], state["completion_tokens"] = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            return JSONResponse(answer, status)
        return StreamingResponse(answer, status, media_type="text/event-stream")

    async def respond(request: Request, req: Sampling, prompt_ids: list[int], kind: str):
        state = request.scope["state"]
        limit = max_new_tokens(req, settings.limits)
        if len(prompt_ids) > settings.limits.max_prompt_tokens:
            raise BadRequest(f"prompt is {len(prompt_ids)} tokens, over the gateway's limit of {settings.limits.max_prompt_tokens}")
        room = backend.package["context_length"] - len(prompt_ids)
        if limit > room:
            if req.max_tokens or getattr(req, "max_completion_tokens", None):
                raise BadRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({limit}) is over the model's context "
                                 f"length of {backend.package['context_length']}; ask for at most {max(room, 0)}")
            limit = room  # the default limit shrinks to what fits
        if limit < 1:
            raise BadRequest(f"prompt ({len(prompt_ids)} tokens) fills the model's context length of {backend.package['context_length']}")
        state["prompt_tokens"] = len(prompt_ids)
        request_id = state["request_id"] = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created, obj = int(time.time()), "chat.completion" if kind == "chat" else "text_completion"

        def choice(text: str, finish: str | None, final: bool) -> dict:
            if kind == "chat":
                key = "message" if final else "delta"
                return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        def usage() -> dict:
            done = state.get("completion_tokens", 0)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": done, "total_tokens": len(prompt_ids) + done}

        def steps():
            for delta, finish, count in backend.generate(prompt_ids, limit):
                state["completion_tokens"] = count
                yield delta, finish

        if not req.stream:
            def whole() -> dict:
                parts, finish = [], None
                for delta, finish in steps():
                    parts.append(delta)
                text = "".join(parts)
                if settings.log_text:
                    state["text"] = {"prompt_tokens": prompt_ids, "output": text}
                return {"id": request_id, "object": obj, "created": created, "model": settings.model_name,
                        "choices": [choice(text, finish, final=True)], "usage": usage()}
            return await run_in_threadpool(whole)

        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def events():
            for step, (delta, finish) in enumerate(steps()):
                chunk = choice(delta, finish, final=False)
                if kind == "chat" and step > 0:
                    del chunk["delta"]["role"]  # OpenAI sends the role in the first chunk only
                yield sse({"id": request_id, "object": chunk_obj, "created": created, "model": settings.model_name,
                           "choices": [chunk]})
            if include_usage:
                yield sse({"id": request_id, "object": chunk_obj, "created": created, "model": settings.model_name,
                           "choices": [], "usage": usage()})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", dependencies=[gateway.require("infer")])
    async def chat_completions(req: ChatRequest, request: Request):
        check_sampling(req, settings.model_name)
        if isinstance(backend, Upstream):
            max_new_tokens(req, settings.limits)
            return await forward(request, "/v1/chat/completions", req)
        return await respond(request, req, backend.chat_prompt([m.model_dump(exclude_none=True) for m in req.messages]), "chat")

    @app.post("/v1/completions", dependencies=[gateway.require("infer")])
    async def completions(req: CompletionRequest, request: Request):
        check_sampling(req, settings.model_name)
        if isinstance(backend, Upstream):
            max_new_tokens(req, settings.limits)
            return await forward(request, "/v1/completions", req)
        return await respond(request, req, backend.text_prompt(req.prompt), "text")

    @app.get("/v1/deployment", dependencies=[gateway.require("view")])
    async def deployment():
        return {"model": settings.model_name, "backend": backend.kind, "ready": gateway.ready() or isinstance(backend, Upstream),
                "package": backend.package, "limits": settings.limits.__dict__}

    @app.post("/admin/deploy", dependencies=[gateway.require("deploy")], status_code=202)
    async def deploy(body: Deploy, request: Request):
        if isinstance(backend, Upstream):
            raise BadRequest("this gateway forwards to an upstream engine server: deploy the package there", 409)
        request.scope["state"]["detail"] = {"deploy": body.package}
        backend.load_in_background(backend.load, body.package, settings.trusted_signer(), settings.kms())
        return {"status": "loading", "package": body.package}

    @app.post("/admin/undeploy", dependencies=[gateway.require("deploy")])
    async def undeploy(body: Undeploy, request: Request):
        if isinstance(backend, Upstream):
            raise BadRequest("this gateway forwards to an upstream engine server: undeploy it there", 409)
        if body.package_sha256 != backend.package.get("sha256"):
            raise BadRequest(f"package_sha256 {body.package_sha256[:16]}… is not the served package "
                             f"({str(backend.package.get('sha256'))[:16]}…); GET /v1/deployment shows it", 409)
        request.scope["state"]["detail"] = {"undeploy": body.package_sha256}
        backend.unload()
        return {"status": "undeployed"}

    @app.get("/admin/limits", dependencies=[gateway.require("adjust")])
    async def get_limits():
        return settings.limits.__dict__

    @app.put("/admin/limits", dependencies=[gateway.require("adjust")])
    async def put_limits(changes: dict, request: Request):
        try:
            settings.limits.update(changes)
        except ValueError as err:
            raise BadRequest(str(err)) from None
        request.scope["state"]["detail"] = {"limits": changes}
        return settings.limits.__dict__

    @app.get("/audit/events", dependencies=[gateway.require("audit")])
    async def audit_events(since: str | None = None, until: str | None = None, key_id: str | None = None,
                           role: str | None = None, status: int | None = None, endpoint: str | None = None, limit: int = 100):
        found = await run_in_threadpool(gateway.audit.search, since, until, limit, key_id=key_id, role=role,
                                        status=status, endpoint=endpoint)
        return {"events": found, "head": gateway.audit.head}

    @app.get("/audit/alerts", dependencies=[gateway.require("audit")])
    async def audit_alerts(since: str | None = None):
        records = await run_in_threadpool(gateway.audit.search, since, None, 10**9)
        return {"alerts": alerts(records, settings.denied_burst, settings.alert_window_s)}

    @app.get("/metrics", dependencies=[gateway.require("monitor")])
    async def metrics():
        gateway.metrics.ready.set(int(gateway.ready()))
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    gateway.paths = {route.path for route in app.routes}
    app.add_middleware(Guard, gateway=gateway)
    return app
