"""What every request goes through: the ASGI guard (client address; key, address allow-list and rate checked from
the headers before any body is read; body deadline and size limit; metrics; one audit record per request) and the
gateway's state that the routes share (settings, keys, rate limiter, audit log, metrics, the backend)."""

from __future__ import annotations

import asyncio
import time

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from workflow.serve.access import Denied, KeyStore, client_ip
from workflow.serve.audit import AuditWriteFailed
from workflow.serve.backends import InProcess, Upstream
from workflow.serve.deployments import Deployments
from workflow.serve.protocol import error_body
from workflow.serve.ratelimit import RateLimiter, RefusalLimiter, retry_after
from workflow.serve.settings import GatewaySettings


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
        self.closed = Counter("ft2prod_gateway_connections_closed", "Connections closed by the gateway before a request "
                              "came, by reason", ["reason"], registry=self.registry)


SINGLE = ("authorization", "host", "content-length", "transfer-encoding")
"""Headers a request may carry once: two Authorization or Host lines are read differently by different servers, and
Content-Length with Transfer-Encoding frames the body two ways (request smuggling behind a proxy that trusts the
other one). h11 already refuses two different Content-Lengths or two Transfer-Encodings itself."""
CLOSE = {"connection": "close"}


def request_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's headers by lower-case name, decoded as latin-1 (which never fails); Denied (400) for a byte
    outside ASCII (h11 passes obs-text through), a header in SINGLE given twice, or Content-Length beside
    Transfer-Encoding, the last two with the connection closed. Repeated X-Forwarded-For lines are read as one list,
    in order (RFC 9110 5.3), as a proxy that adds its own line means them."""
    headers: dict[str, str] = {}
    for name, value in raw:
        name, text = name.decode("latin-1").lower(), value.decode("latin-1")
        if not text.isascii():
            raise Denied(400, "bad_header", f"header {name} holds a byte outside ASCII; send ASCII header values")
        if name in headers and name in SINGLE:
            raise Denied(400, "repeated_header", f"header {name} given more than once; send it once", CLOSE)
        headers[name] = f"{headers[name]}, {text}" if name in headers else text
    if "content-length" in headers and "transfer-encoding" in headers:
        raise Denied(400, "ambiguous_length", "both Content-Length and Transfer-Encoding given; send one", CLOSE)
    return headers


class Guard:
    """ASGI middleware around every HTTP request: client address; for every path but the probes, the API key, its
    role's address allow-list and its rate, from the headers alone (a refused client's body is never read); the
    body within rollout.gateway.deadlines.body_s (else 408, connection closed) and limits.max_body_bytes; metrics
    and one audit record written when the last byte of the answer (streams included) has been sent."""

    def __init__(self, app, gateway: Gateway) -> None:
        self.app, self.gateway = app, gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        g, began = self.gateway, time.perf_counter()
        state = scope.setdefault("state", {})
        state["client_ip"] = scope["client"][0]
        outcome = {"status": 500, "recorded": False}
        endpoint = scope["path"] if scope["path"] in g.paths else "other"

        def audited(status: int) -> bool:
            outcome["recorded"] = True
            try:
                g.record(state, scope["method"], endpoint, status, time.perf_counter() - began)
                return True
            except AuditWriteFailed:
                return False

        send = audit_before_last_byte(send, outcome, audited)
        g.metrics.in_flight.inc()
        try:
            headers = request_headers(scope["headers"])
            state["client_ip"] = client_ip(scope["client"][0], headers.get("x-forwarded-for"), g.settings.policy.trusted_proxies)
            if scope["path"] not in g.public:
                g.admit(state, headers.get("authorization"))
            body = await self._body_in_time(receive, headers)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        except Denied as denied:
            denied = g.refusal(state, denied, endpoint)
            await JSONResponse(error_body(str(denied), "invalid_request_error", denied.reason), denied.status,
                               denied.headers)(scope, receive, send)
        except Unaudited:
            pass  # a stream whose record could not be written: cut off before its end (uvicorn closes the connection)
        finally:
            g.metrics.in_flight.dec()
            if not outcome["recorded"]:  # the client left, or the app failed, before the last byte
                audited(outcome["status"])

    async def _body_in_time(self, receive, headers: dict) -> bytes:
        seconds = self.gateway.settings.deadlines.body_s
        try:
            async with asyncio.timeout(seconds):
                return await self._bounded_body(receive, headers)
        except TimeoutError:
            # Connection: close, so uvicorn drops the connection instead of waiting for the rest of the body.
            raise Denied(408, "body_timeout", f"request body not complete within rollout.gateway.deadlines.body_s = {seconds} s",
                         {"connection": "close"}) from None

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


class Unaudited(Exception):
    """A streamed answer whose audit record could not be written: it must not complete."""


def audit_before_last_byte(send, outcome: dict, audited):
    """`send`, writing the audit record before the answer's last byte: an answer whose record cannot be written never
    completes. A one-piece answer (start and a single body message) is held until its record is written, and becomes a
    503 when it cannot be; a stream is cut off before its end (Unaudited)."""
    held = []

    async def watched(message):
        if message["type"] == "http.response.start":
            outcome["status"] = message["status"]
            held.append(message)
            return
        if message["type"] == "http.response.body" and not message.get("more_body") and not outcome["recorded"]:
            if not audited(outcome["status"]):
                if not held:
                    raise Unaudited()
                held.clear()
                outcome["status"] = 503
                body = error_body("the audit log cannot be written: nothing is served unaudited; the operators are alerted",
                                  "service_unavailable", "audit_unavailable")
                await JSONResponse(body, 503, {"connection": "close"})({"type": "http"}, None, send)
                return
        while held:
            await send(held.pop())
        await send(message)

    return watched


class Gateway:
    """The gateway's state: settings, keys, audit log, metrics and what it serves."""

    def __init__(self, settings: GatewaySettings, backend: InProcess | Upstream) -> None:
        """backend: either kind; both have the interface workflow.serve.backends describes."""
        self.settings, self.backend = settings, backend
        self.keys = KeyStore(settings.api_keys)
        self.rates = RateLimiter(settings.rate_limits)
        refusals = settings.refusal_limits
        self.refusals = RefusalLimiter(refusals.per_minute, refusals.burst, refusals.max_addresses)
        self.audit = settings.audit_log()
        self.deployments = Deployments(self.audit)  # before the first prune, which carries its state forward
        self.audit.prune()  # retention applies from the start; then daily, as records are appended
        self.metrics = Metrics()
        self.paths: set[str] = set()
        self.public: set[str] = set()
        """Paths served without a key (the probes); create_app fills both from its routes."""

    def refusal(self, state: dict, denied: Denied, endpoint: str) -> Denied:
        """The answer to a request the guard refuses: `denied` itself while the client's address is within its
        refusal bucket; past it, 429 with Retry-After, and the refusal is only counted (record writes no record of
        its own; flush_refusals writes the counts)."""
        state["reason"] = denied.reason
        wait = self.refusals.admit(state["client_ip"])
        if not wait:
            return denied
        self.refusals.count(state["client_ip"], denied.reason, denied.status, endpoint)
        state["aggregated"] = True
        limit = self.settings.refusal_limits
        return Denied(429, "too_many_refusals", f"too many refused requests from this address (over {limit.per_minute:g} "
                      f"per minute, burst {limit.burst}); retry in {wait:.1f} s",
                      {"retry-after": retry_after(wait)} | (denied.headers or {}))

    def refused_by_server(self, peer: str) -> None:
        """uvicorn answered 400 to bytes that are not HTTP/1.1 (h11 refused them): audit it like any refusal."""
        state = {"client_ip": peer}
        self.refusal(state, Denied(400, "malformed_http", "not a valid HTTP/1.1 request"), "other")
        try:
            self.record(state, "?", "other", 400, 0.0)
        except AuditWriteFailed:  # uvicorn's answer is sent already; the audit log raised its own alert
            pass

    def flush_refusals(self) -> int:
        """Write the refusals counted past the per-address buckets as aggregated audit records; how many."""
        summaries = self.refusals.summaries()
        for summary in summaries:
            self.audit.record_refusals(**summary)
        return len(summaries)

    def record(self, state: dict, method: str, endpoint: str, status: int, seconds: float) -> None:
        identity = state.get("identity")
        role = identity.role if identity else "none"
        if state.get("aggregated"):  # counted by the refusal limiter: one aggregated record, not one each
            self.metrics.requests.labels(endpoint, str(status), role).inc()
            self.metrics.denied.labels("too_many_refusals").inc()
            return
        event = {"event": "request", "method": method, "endpoint": endpoint, "status": status,
                 "key_id": identity.key_id if identity else None, "role": role, "client_ip": state.get("client_ip"),
                 "latency_ms": round(seconds * 1000, 1), "prompt_tokens": state.get("prompt_tokens", 0),
                 "completion_tokens": state.get("completion_tokens", 0)}
        for name in ("reason", "detail", "request_id"):
            if name in state:
                event[name] = state[name]
        if self.settings.audit.log_text and "text" in state:
            event["text"] = state["text"]
        self.audit.append(event)
        self.metrics.requests.labels(endpoint, str(status), role).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        self.metrics.tokens.labels("prompt").inc(state.get("prompt_tokens", 0))
        self.metrics.tokens.labels("completion").inc(state.get("completion_tokens", 0))
        if status in (401, 403, 413) or "reason" in state:
            self.metrics.denied.labels(state.get("reason", str(status))).inc()

    def admit(self, state: dict, authorization: str | None) -> None:
        """From the headers alone, before any body is read: a known, unexpired key (401), from an address its role's
        allow-list holds (403), within its rate (429 with Retry-After). Routes check the role's permission."""
        identity = self.keys.identify(authorization)
        state["identity"] = identity
        self.settings.policy.check_address(identity, state["client_ip"])
        wait = self.rates.wait(identity.key_id, identity.role)
        if wait:
            rate = getattr(self.settings.rate_limits, identity.role)
            raise Denied(429, "rate_limited", f"key {identity.key_id} is over the {identity.role} rate limit "
                         f"({rate.requests_per_minute:g} requests per minute, burst {rate.burst}); retry in {wait:.1f} s",
                         {"retry-after": retry_after(wait)})

    def require(self, permission: str):
        def check(request: Request) -> None:
            state = request.scope["state"]
            identity = state.get("identity") or self.keys.identify(request.headers.get("authorization"))
            state["identity"] = identity
            self.settings.policy.authorize(identity, state["client_ip"], permission)

        return Depends(check)
