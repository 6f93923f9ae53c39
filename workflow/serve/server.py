"""Run the gateway under uvicorn, TLS 1.3 only, with graceful shutdown (SIGTERM finishes in-flight requests)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import uvicorn

from workflow.config import Config
from workflow.package import archive

from workflow.serve.app import create_app
from workflow.serve.backends import InProcess, Upstream
from workflow.serve.connections import with_header_deadline
from workflow.serve.guard import Gateway
from workflow.serve.protocol import BadRequest
from workflow.serve.settings import GatewaySettings
from workflow.serve.tls import ensure_certificates, restrict_to_tls13

log = logging.getLogger(__name__)


def build(config: Config, package: str | None = None, model_dir: str | None = None, audit_path: str | None = None):
    """The FastAPI app and its Gateway for a workflow config."""
    settings = GatewaySettings.from_config(config, audit_path)
    key_env = config.rollout.gateway.upstream_key_env
    upstream_key = os.environ.get(key_env) if key_env else None
    backend = Upstream(settings.upstream, upstream_key) if settings.upstream else InProcess(config.engine)
    gateway = Gateway(settings, backend)
    return create_app(gateway, package, model_dir), gateway


def check_floor(gateway: Gateway, package: str | None, model_dir: str | None) -> None:
    """The anti-rollback floor holds across restarts and pods: a package older than the newest one served (by this
    gateway or a replica sharing its audit folder) is refused at start, given encrypted (`package`) or as the folder a
    Kubernetes init container opened it into (`model_dir`, judged by the record open_package left there)."""
    if package:
        trusted, _ = gateway.settings.trusted_signer(), gateway.settings.kms()
        gateway.backend.deployments = gateway.deployments
        gateway.backend.checked(Path(package), trusted, None, rollback=False)
    elif model_dir:
        opened = archive.opened_from(model_dir)
        gateway.deployments.check(opened["sha256"], opened["created"], rollback=False)


def serve(config: Config, package: str | None = None, model_dir: str | None = None, host: str | None = None,
          port: int | None = None, audit_path: str | None = None) -> None:
    gateway_section = config.rollout.gateway
    files = ensure_certificates(gateway_section.tls.dir, gateway_section.tls.hosts)
    app, gateway = build(config, package, model_dir, audit_path)
    try:  # fail now, with a clear message, rather than inside the server's start-up
        check_floor(gateway, package, model_dir)
    except (BadRequest, archive.PackageError) as err:
        raise ValueError(f"refusing to start: {err}") from None
    deadlines = gateway_section.deadlines
    settings = uvicorn.Config(
        app, host=host or gateway_section.host, port=port if port is not None else gateway_section.port,
        ssl_certfile=str(files.cert), ssl_keyfile=str(files.key), timeout_graceful_shutdown=gateway_section.graceful_shutdown_s,
        log_level="info", access_log=False, limit_concurrency=gateway_section.max_connections,
        # headers within deadlines.header_s (the body's deadline is the guard's); idle keep-alive closed after keep_alive_s
        http=with_header_deadline(deadlines.header_s, lambda reason: gateway.metrics.closed.labels(reason).inc(),
                                  gateway.refused_by_server),
        timeout_keep_alive=deadlines.keep_alive_s,
        proxy_headers=False,  # X-Forwarded-For is believed only from rollout.gateway.trusted_proxies (access.client_ip)
    )
    settings.load()
    restrict_to_tls13(settings.ssl)
    log.info("gateway on https://%s:%s (TLS 1.3 only), CA %s", settings.host, settings.port, Path(files.ca).resolve())
    uvicorn.Server(settings).run()
