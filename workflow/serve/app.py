"""The gateway: an OpenAI-compatible API behind API keys, roles, IP allow-lists, limits and an audit log.

    python -m workflow.serve start --package results/package/model.ftpkg      # see docs/gateway-and-rollout.md

| endpoint | permission | roles |
| --- | --- | --- |
| GET /healthz, /readyz | none (probes) | anyone |
| GET /v1/models, POST /v1/chat/completions, /v1/completions | infer | analyst |
| GET /v1/deployment | view | admin, analyst, auditor |
| POST /admin/deploy, /admin/undeploy | deploy | admin |
| GET, PUT /admin/limits; POST /admin/audit/prune | adjust | admin |
| GET /audit/events, /audit/alerts | audit | auditor |
| GET /metrics | monitor | auditor |
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import Response

from workflow.serve import openapi
from workflow.serve.access import Denied
from workflow.serve.audit import AuditTampered, alerts
from workflow.serve.backends import NotReady, UpstreamError
from workflow.serve.deployments import DIGEST
from workflow.serve.guard import Gateway, Guard
from workflow.serve.openapi import (
    GUARDED,
    KEYED,
    Alert,
    Alive,
    AuditAlerts,
    AuditEvents,
    AuditRecord,
    Deployment,
    LimitsChange,
    Loading,
    Pruned,
    NotReadyAnswer,
    Ready,
    Undeployed,
    answers,
    api_key,
    refusals,
)
from workflow.serve.protocol import (
    BadRequest,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    CompletionRequest,
    ModelList,
    TextCompletion,
    TextCompletionChunk,
    check_sampling,
    error_body,
)
from workflow.serve.settings import Limits


class Deploy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    package_sha256: str = Field(pattern=DIGEST.pattern)
    """The package's digest; the gateway takes it from its own package root (rollout.gateway.package_root)."""
    rollback: bool = False
    """Allow a package older than the one served, if it is the one served just before it."""


class Undeploy(BaseModel):
    package_sha256: str
    """The digest of the package being served: undeploy says what it takes down."""


log = logging.getLogger(__name__)


async def write_refusal_summaries(gateway: Gateway) -> None:
    """Every refusal_limits.summary_every_s, the refusals counted past the per-address buckets as aggregated records."""
    while True:
        await asyncio.sleep(gateway.settings.refusal_limits.summary_every_s)
        try:
            gateway.flush_refusals()
        except Exception:  # an audit write that fails must not stop the summaries for good
            log.exception("writing the aggregated refusal records failed")


def single_valued(request: Request) -> None:
    """A query parameter given twice is refused rather than the last one taken: a proxy or log in front could read
    the other one (HTTP parameter pollution)."""
    repeated = sorted({name for name in request.query_params if len(request.query_params.getlist(name)) > 1})
    if repeated:
        raise BadRequest(f"query parameter(s) {', '.join(repeated)} given more than once; send each once")


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal in the gateway's error shape (ErrorBody), with the audit log's reason."""

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest):
        request.scope["state"]["reason"] = "bad_request"
        return JSONResponse(error_body(str(err), "invalid_request_error"), err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        request.scope["state"]["reason"] = "bad_request"
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in err.errors())
        return JSONResponse(error_body(f"invalid request: {problems}", "invalid_request_error"), 400)

    @app.exception_handler(HTTPException)
    async def refused_by_framework(request: Request, err: HTTPException):
        """FastAPI's and Starlette's own refusals (a body that is not UTF-8 text, an unknown path or method) in the
        gateway's error shape, not theirs ({"detail": ...})."""
        message = str(err.detail)
        if err.status_code == 400:
            request.scope["state"]["reason"] = "bad_request"
            message = f"invalid request: {message}; send a JSON body encoded as UTF-8"
        return JSONResponse(error_body(message, "invalid_request_error"), err.status_code, headers=err.headers)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, err: NotReady):
        return JSONResponse(error_body(f"not ready: {err}", "service_unavailable"), 503)

    @app.exception_handler(UpstreamError)
    async def upstream_failed(request: Request, err: UpstreamError):
        request.scope["state"]["reason"] = "upstream_error"
        log.warning("upstream: %s", err)
        return JSONResponse(error_body(f"bad gateway: {err}", "upstream_error"), 502)

    @app.exception_handler(Denied)
    async def denied(request: Request, err: Denied):
        request.scope["state"]["reason"] = err.reason
        return JSONResponse(error_body(str(err), "invalid_request_error", err.reason), err.status)


def allowed(gateway: Gateway, permission: str) -> list:
    return [gateway.require(permission), Depends(api_key)]


def add_probes(app: FastAPI, gateway: Gateway) -> None:
    """/healthz and /readyz: no key (they are the orchestrator's probes)."""
    backend = gateway.backend

    @app.get("/healthz", responses=answers(Alive) | refusals(*GUARDED))
    async def healthz():
        return Alive(status="alive")

    @app.get("/readyz", responses=answers(Ready) | refusals(*GUARDED) | {503: {"model": NotReadyAnswer}})
    async def readyz():
        ready = await backend.is_ready()
        gateway.metrics.ready.set(int(ready))
        if ready:
            return Ready(status="ready")  # anyone may ask: what is served is GET /v1/deployment's, behind a key
        return JSONResponse(NotReadyAnswer(status="not ready", reason=backend.not_ready_reason()).model_dump(), 503)


def add_inference(app: FastAPI, gateway: Gateway) -> None:
    """The OpenAI routes (infer) and what is served (view)."""
    settings, backend = gateway.settings, gateway.backend

    @app.get("/v1/models", dependencies=allowed(gateway, "infer"), responses=answers(ModelList) | refusals(*KEYED, 502, 503))
    async def models():
        return await backend.models(settings)

    @app.post("/v1/chat/completions", dependencies=allowed(gateway, "infer"),
              responses=answers(ChatCompletion, ChatCompletionChunk) | refusals(*KEYED, 404, 502, 503))
    async def chat_completions(req: ChatRequest, request: Request):
        check_sampling(req, settings.model_name)
        return await backend.complete("chat", req, request.scope["state"], settings)

    @app.post("/v1/completions", dependencies=allowed(gateway, "infer"),
              responses=answers(TextCompletion, TextCompletionChunk) | refusals(*KEYED, 404, 502, 503))
    async def completions(req: CompletionRequest, request: Request):
        check_sampling(req, settings.model_name)
        return await backend.complete("text", req, request.scope["state"], settings)

    @app.get("/v1/deployment", dependencies=allowed(gateway, "view"), responses=answers(Deployment) | refusals(*KEYED))
    async def deployment():
        return Deployment(model=settings.model_name, backend=backend.kind, ready=backend.serving(), package=backend.package,
                          limits=settings.limits.model_copy())


def add_admin(app: FastAPI, gateway: Gateway) -> None:
    """Deploy and undeploy (deploy); the live limits and the audit log's retention (adjust)."""
    settings, backend = gateway.settings, gateway.backend

    @app.post("/admin/deploy", dependencies=allowed(gateway, "deploy"), status_code=202,
              responses={202: {"model": Loading}} | refusals(*KEYED, 404, 409))
    async def deploy(body: Deploy, request: Request):
        request.scope["state"]["detail"] = {"deploy": body.package_sha256, "rollback": body.rollback}
        backend.deploy(body.package_sha256, body.rollback, settings)
        return Loading(status="loading", package_sha256=body.package_sha256)

    @app.post("/admin/undeploy", dependencies=allowed(gateway, "deploy"), responses=answers(Undeployed) | refusals(*KEYED, 409))
    async def undeploy(body: Undeploy, request: Request):
        backend.undeploy(body.package_sha256)
        request.scope["state"]["detail"] = {"undeploy": body.package_sha256}
        return Undeployed(status="undeployed")

    @app.get("/admin/limits", dependencies=allowed(gateway, "adjust"), responses=answers(Limits) | refusals(*KEYED))
    async def get_limits():
        return settings.limits.model_copy()

    @app.put("/admin/limits", dependencies=allowed(gateway, "adjust"), responses=answers(Limits) | refusals(*KEYED))
    async def put_limits(body: LimitsChange, request: Request):
        changes = body.model_dump(exclude_unset=True)
        try:
            settings.limits.update(changes)
        except ValueError as err:
            raise BadRequest(str(err)) from None
        request.scope["state"]["detail"] = {"limits": changes}
        return settings.limits.model_copy()

    @app.post("/admin/audit/prune", dependencies=allowed(gateway, "adjust"), responses=answers(Pruned) | refusals(*KEYED, 409))
    async def audit_prune(request: Request):
        try:  # under the log's own lock: the chain never forks; a log that does not verify loses nothing
            pruned = await run_in_threadpool(gateway.audit.prune)
        except AuditTampered as err:
            raise BadRequest(f"nothing pruned: the audit log does not verify ({err}); run `audit verify`", 409) from None
        request.scope["state"]["detail"] = {"pruned": pruned}
        return Pruned(pruned=pruned, retention_days=settings.audit.retention_days)


def add_audit(app: FastAPI, gateway: Gateway) -> None:
    """The audit log and its alerts (audit), and the Prometheus metrics (monitor)."""
    settings = gateway.settings

    @app.get("/audit/events", dependencies=allowed(gateway, "audit"), responses=answers(AuditEvents) | refusals(*KEYED))
    async def audit_events(since: str | None = None, until: str | None = None, key_id: str | None = None,
                           role: str | None = None, status: int | None = None, endpoint: str | None = None,
                           limit: Annotated[int, Query(ge=1)] = 100):
        found = await run_in_threadpool(gateway.audit.search, since, until, limit, key_id=key_id, role=role,
                                        status=status, endpoint=endpoint)
        return AuditEvents(events=[AuditRecord(**record) for record in found], head=gateway.audit.head)

    @app.get("/audit/alerts", dependencies=allowed(gateway, "audit"), responses=answers(AuditAlerts) | refusals(*KEYED))
    async def audit_alerts(since: str | None = None):
        records = await run_in_threadpool(gateway.audit.search, since, None, 10**9)
        found = alerts(records, settings.denied_burst, settings.alert_window_s) + gateway.audit.failures
        return AuditAlerts(alerts=[Alert(**alert) for alert in found])

    @app.get("/metrics", dependencies=allowed(gateway, "monitor"), response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}} | refusals(*KEYED))
    async def metrics():
        gateway.metrics.ready.set(int(gateway.backend.serving()))
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(gateway: Gateway, package: str | None = None, model_dir: str | None = None) -> FastAPI:
    """The app; an in-process gateway starts loading `package` (encrypted) or `model_dir` (already opened)."""
    settings, backend = gateway.settings, gateway.backend

    async def lifespan(app):
        backend.start(settings, package, model_dir, gateway.deployments)
        summaries = asyncio.create_task(write_refusal_summaries(gateway))
        yield
        summaries.cancel()
        try:
            gateway.flush_refusals()  # what was counted since the last summary is not lost at shutdown
        except Exception:
            log.exception("writing the last aggregated refusal records failed")

    app = FastAPI(title="ft2prod gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(single_valued)])
    app.openapi = lambda: openapi.document(app, settings.model_name)
    add_error_handlers(app)
    for add_routes in (add_probes, add_inference, add_admin, add_audit):
        add_routes(app, gateway)
    gateway.paths = {route.path for route in app.routes}
    # The probes: routes with no dependency of their own beyond the app-wide ones (they never ask for a key).
    gateway.public = {route.path for route in app.routes if len(getattr(route, "dependencies", ())) <= len(app.router.dependencies)}
    app.add_middleware(Guard, gateway=gateway)
    return app
