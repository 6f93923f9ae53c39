"""The gateway: an OpenAI-compatible API behind API keys, roles, IP allow-lists, limits and an audit log.

    python -m workflow.serve start --package results/package/model.ftpkg      # see docs/gateway-and-rollout.md

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

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from workflow.serve.access import Denied
from workflow.serve.audit import alerts
from workflow.serve.backends import NotReady
from workflow.serve.guard import Gateway, Guard
from workflow.serve.protocol import BadRequest, ChatRequest, CompletionRequest, check_sampling, error_body


class Deploy(BaseModel):
    package: str


class Undeploy(BaseModel):
    package_sha256: str
    """The digest of the package being served: undeploy says what it takes down."""


def create_app(gateway: Gateway, package: str | None = None, model_dir: str | None = None) -> FastAPI:
    """The app; an in-process gateway starts loading `package` (encrypted) or `model_dir` (already opened)."""
    settings, backend = gateway.settings, gateway.backend

    async def lifespan(app):
        backend.start(settings, package, model_dir)
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
        ready = await backend.is_ready()
        gateway.metrics.ready.set(int(ready))
        if ready:
            return {"status": "ready", "package": backend.package}
        return JSONResponse({"status": "not ready", "reason": backend.not_ready_reason()}, 503)

    @app.get("/v1/models", dependencies=[gateway.require("infer")])
    async def models():
        return await backend.models(settings)

    @app.post("/v1/chat/completions", dependencies=[gateway.require("infer")])
    async def chat_completions(req: ChatRequest, request: Request):
        check_sampling(req, settings.model_name)
        return await backend.complete("chat", req, request.scope["state"], settings)

    @app.post("/v1/completions", dependencies=[gateway.require("infer")])
    async def completions(req: CompletionRequest, request: Request):
        check_sampling(req, settings.model_name)
        return await backend.complete("text", req, request.scope["state"], settings)

    @app.get("/v1/deployment", dependencies=[gateway.require("view")])
    async def deployment():
        return {"model": settings.model_name, "backend": backend.kind, "ready": backend.serving(),
                "package": backend.package, "limits": settings.limits.model_dump()}

    @app.post("/admin/deploy", dependencies=[gateway.require("deploy")], status_code=202)
    async def deploy(body: Deploy, request: Request):
        backend.deploy(body.package, settings)
        request.scope["state"]["detail"] = {"deploy": body.package}
        return {"status": "loading", "package": body.package}

    @app.post("/admin/undeploy", dependencies=[gateway.require("deploy")])
    async def undeploy(body: Undeploy, request: Request):
        backend.undeploy(body.package_sha256)
        request.scope["state"]["detail"] = {"undeploy": body.package_sha256}
        return {"status": "undeployed"}

    @app.get("/admin/limits", dependencies=[gateway.require("adjust")])
    async def get_limits():
        return settings.limits.model_dump()

    @app.put("/admin/limits", dependencies=[gateway.require("adjust")])
    async def put_limits(changes: dict, request: Request):
        try:
            settings.limits.update(changes)
        except ValueError as err:
            raise BadRequest(str(err)) from None
        request.scope["state"]["detail"] = {"limits": changes}
        return settings.limits.model_dump()

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
        gateway.metrics.ready.set(int(backend.serving()))
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    gateway.paths = {route.path for route in app.routes}
    gateway.public = {route.path for route in app.routes if not getattr(route, "dependencies", None)}  # the probes
    app.add_middleware(Guard, gateway=gateway)
    return app
