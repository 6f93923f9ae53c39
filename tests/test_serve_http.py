"""Raw HTTP against the running gateway (uvicorn, TLS 1.3, the tiny model's package): the requests a schema fuzz cannot
send — bytes outside ASCII in headers, repeated Authorization/Host/Content-Length, Content-Length beside
Transfer-Encoding (request smuggling), repeated X-Forwarded-For — written to a TLS socket byte for byte; a flood of
wrong keys from one address; and what the gateway tells whom (/readyz, 403s, an upstream's failure, limit bounds)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from test_serve import MODEL, Served, chat, package  # noqa: F401  (package: the module fixture, the tiny model's package)

from workflow.finetune.launch import free_port
from workflow.serve.tls import client_context
from workflow.wait import wait_for


@pytest.fixture(scope="module")
def gateway(package):  # noqa: F811  (the fixture)
    served = Served(package.parent / "http", package)  # the default refusal limits (30 at once, 60 a minute)
    served.wait_ready()
    yield served
    served.stop()


def exchange(served: Served, raw: bytes, wait_s: float = 10) -> tuple[list[tuple[int, dict, bytes]], bool]:
    """Send `raw` on a fresh TLS connection; (every answer read: status, headers, body), and whether the gateway
    closed the connection within wait_s."""
    sock = client_context(served.ca).wrap_socket(socket.create_connection(("127.0.0.1", served.port)),
                                                 server_hostname="127.0.0.1")
    received, closed, began = b"", False, time.monotonic()
    with sock:
        sock.sendall(raw)
        while time.monotonic() - began < wait_s:
            sock.settimeout(max(0.1, wait_s - (time.monotonic() - began)))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                closed = True
                break
            received += chunk
    return parse_answers(received), closed


def parse_answers(data: bytes) -> list[tuple[int, dict, bytes]]:
    answers = []
    while data.startswith(b"HTTP/1.1 "):
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {k.strip().lower().decode(): v.strip().decode() for k, _, v in (line.partition(b":") for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        answers.append((int(lines[0].split(b" ")[1]), headers, rest[:length]))
        data = rest[length:]
    return answers


def head(method: str, path: str, *lines: str | bytes, body: bytes = b"") -> bytes:
    parts = [f"{method} {path} HTTP/1.1".encode()] + [line.encode() if isinstance(line, str) else line for line in lines]
    return b"\r\n".join(parts) + b"\r\n\r\n" + body


def records(served: Served, **equals) -> list[dict]:
    path = served.root / "audit.jsonl"
    found = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in found if all(r.get(k) == v for k, v in equals.items())]


def recorded(served: Served, **equals) -> list[dict]:
    """The audit records that match, waiting for the first: a record is written after the answer's last byte."""
    wait_for(lambda: records(served, **equals), f"an audit record with {equals}", 10, every=0.1)
    return records(served, **equals)


HOST = "Host: 127.0.0.1"
CLOSE = "Connection: close"  # the gateway closes after its answer: exchange need not wait for the keep-alive timeout


def test_a_header_byte_outside_ascii_is_a_400_with_an_audit_record_on_every_path(gateway):
    """h11 passes obs-text (bytes 0x80-0xff) through; the guard decoded headers as UTF-8 outside its error handling,
    so such a byte was a 500 with a traceback and no audit record, with no key, on the probes too."""
    key = f"Authorization: Bearer {gateway.keys['analyst']}"
    for path, extra in (("/healthz", []), ("/readyz", []), ("/v1/models", []), ("/v1/models", [key])):
        for bad in (b"X-Note: caf\xe9", b"User-Agent: \xff\xfe", b"X-Forwarded-For: 10.1.2.3\xa0"):
            before = len(records(gateway, reason="bad_header"))
            answers, _ = exchange(gateway, head("GET", path, HOST, CLOSE, *extra, bad))
            assert [status for status, _, _ in answers] == [400], (path, bad, answers)
            assert json.loads(answers[0][2])["error"]["code"] == "bad_header"
            wait_for(lambda: len(records(gateway, reason="bad_header")) == before + 1, "the audit record", 10, every=0.1)
    assert "Traceback" not in (gateway.root / "gateway.log").read_text()


def test_a_repeated_authorization_or_host_is_refused_audited_and_the_connection_closed(gateway):
    """Two Authorization lines: the last one won (a proxy that checks the first lets the second through). Two Host
    lines: h11 refuses them itself, and uvicorn's 400 had no audit record."""
    good, wrong = f"Authorization: Bearer {gateway.keys['analyst']}", "Authorization: Bearer ftk-wrong"
    answers, closed = exchange(gateway, head("GET", "/v1/models", HOST, wrong, good) + head("GET", "/healthz", HOST))
    assert [status for status, _, _ in answers] == [400] and closed, answers
    assert json.loads(answers[0][2])["error"]["code"] == "repeated_header" and answers[0][1]["connection"] == "close"
    assert recorded(gateway, reason="repeated_header", endpoint="/v1/models")
    before = len(records(gateway, reason="malformed_http"))
    answers, closed = exchange(gateway, head("GET", "/v1/models", HOST, "Host: internal.example", good) + head("GET", "/healthz", HOST))
    assert [status for status, _, _ in answers] == [400] and closed, answers
    wait_for(lambda: len(records(gateway, reason="malformed_http")) == before + 1, "the audit record", 10, every=0.1)


def test_content_length_with_transfer_encoding_is_refused_not_answered_as_two_requests(gateway):
    """CL + TE: h11 frames the body by Transfer-Encoding, so what a Content-Length proxy saw as one request's body was a
    second request here (smuggled past the proxy's own checks). Now one 400, and the connection is closed."""
    smuggled = head("GET", "/v1/models", HOST, f"Authorization: Bearer {gateway.keys['analyst']}")
    chunked = b"0\r\n\r\n" + smuggled
    raw = head("POST", "/v1/chat/completions", HOST, "Content-Type: application/json", f"Content-Length: {len(chunked)}",
               "Transfer-Encoding: chunked", body=chunked)
    answers, closed = exchange(gateway, raw)
    assert [status for status, _, _ in answers] == [400] and closed, answers
    assert json.loads(answers[0][2])["error"]["code"] == "ambiguous_length"
    assert recorded(gateway, reason="ambiguous_length")


def test_conflicting_content_lengths_and_malformed_http_are_refused_and_audited(gateway):
    """h11 refuses these itself and uvicorn answered 400 with no audit record: now each is audited (malformed_http)."""
    before = len(records(gateway, reason="malformed_http"))
    for raw in (head("POST", "/v1/completions", HOST, "Content-Length: 2", "Content-Length: 3", body=b"{}"),
                head("GET", "/healthz", HOST, b"X-N\xe9me: 1"),  # a header name outside the token characters
                head("GET", "/healthz", HOST, "Transfer-Encoding: gzip")):
        answers, closed = exchange(gateway, raw + head("GET", "/healthz", HOST))
        assert [status for status, _, _ in answers] == [400] and closed, (raw, answers)
    wait_for(lambda: len(records(gateway, reason="malformed_http")) == before + 3, "three audit records", 10, every=0.1)


def test_repeated_forwarded_for_lines_are_read_as_one_list(gateway):
    """From a trusted proxy, repeated X-Forwarded-For lines are one list in order (RFC 9110 5.3): only the last line
    was read, so a client behind the proxy that sent its own line ending in a trusted address was taken for the proxy."""
    admin = f"Authorization: Bearer {gateway.keys['admin']}"
    raw = head("GET", "/admin/limits", HOST, CLOSE, admin, "X-Forwarded-For: 203.0.113.9", "X-Forwarded-For: 127.0.0.1")
    answers, _ = exchange(gateway, raw)
    assert [status for status, _, _ in answers] == [403], answers
    assert recorded(gateway, reason="ip_not_allowed", client_ip="203.0.113.9", endpoint="/admin/limits")
    analyst = f"Authorization: Bearer {gateway.keys['analyst']}"
    allowed, _ = exchange(gateway, head("GET", "/v1/models", HOST, CLOSE, analyst, "X-Forwarded-For: 192.0.2.1",
                                        "X-Forwarded-For: 10.1.2.3"))
    assert [status for status, _, _ in allowed] == [200]  # right-most untrusted hop: 10.1.2.3, on the analyst list


def test_probes_and_403s_say_nothing_about_the_package_or_the_key(gateway):
    with gateway.http() as anyone:
        assert anyone.get("/readyz").json() == {"status": "ready"}, "digest, path and creation time need a key"
    with gateway.http("analyst") as analyst:
        forbidden = analyst.get("/admin/limits")
        assert analyst.get("/v1/deployment").json()["package"]["sha256"]  # still there for a key with `view`
    with gateway.http("analyst", **{"X-Forwarded-For": "203.0.113.7"}) as away:
        outside = away.get("/v1/models")
    for answer in (forbidden, outside):
        assert answer.status_code == 403 and "analyst" not in answer.text and "role" not in answer.json()["error"]["message"]
    assert recorded(gateway, reason="role_forbidden", role="analyst"), "the audit record keeps the role"


def test_limits_are_bounded_at_run_time(gateway):
    with gateway.http("admin") as admin:
        huge = admin.put("/admin/limits", json={"max_tokens": 2**40})
        assert huge.status_code == 400 and "max_tokens" in huge.json()["error"]["message"], huge.text
    from workflow.config import MAX_BODY_BYTES, MAX_TOKENS

    with gateway.http("admin") as admin:
        for name, top in (("max_body_bytes", MAX_BODY_BYTES), ("max_prompt_tokens", MAX_TOKENS), ("max_tokens", MAX_TOKENS)):
            before = admin.get("/admin/limits").json()
            for value in (2**40, top + 1):
                refused = admin.put("/admin/limits", json={name: value})
                assert refused.status_code == 400 and name in refused.json()["error"]["message"], refused.text
            assert admin.get("/admin/limits").json() == before, "nothing applied"
            assert admin.put("/admin/limits", json={name: top}).json()[name] == top
            assert admin.put("/admin/limits", json={name: before[name]}).status_code == 200


@pytest.mark.slow
def test_a_flood_of_wrong_keys_from_one_address_is_answered_429_and_audited_in_aggregate(package, tmp_path):  # noqa: F811
    """1,000 wrong-key requests from one address as fast as it can: each was a 401 with its own audit record. Now the
    first `burst` get their 401 and record, the rest 429 with Retry-After and one aggregated record; a valid key from
    the same address is still served."""
    served = Served(tmp_path / "flood", package)
    try:
        served.wait_ready()
        answers, began = [], time.monotonic()

        def wrong_keys(_: int) -> list[httpx2.Response]:
            with served.http(Authorization="Bearer ftk-wrong") as client:
                return [client.get("/v1/models") for _ in range(125)]

        with ThreadPoolExecutor(8) as pool:
            for batch in pool.map(wrong_keys, range(8)):
                answers += batch
        flood_s = time.monotonic() - began
        with served.http("analyst") as analyst:
            assert analyst.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
    finally:
        served.stop()  # writes what was counted since the last summary
    statuses = [answer.status_code for answer in answers]
    limited = [answer for answer in answers if answer.status_code == 429]
    assert limited and all(a.json()["error"]["code"] == "too_many_refusals" and int(a.headers["retry-after"]) >= 1 for a in limited)
    one_by_one = records(served, reason="unknown_key", event="request")
    aggregated = records(served, event="refused.aggregate")
    print(f"1000 wrong keys in {flood_s:.1f} s: {len(one_by_one)} records of their own, {len(aggregated)} aggregated")
    assert statuses.count(401) == len(one_by_one) and len(limited) == 1000 - len(one_by_one)
    assert 30 <= len(one_by_one) <= 30 + flood_s + 2, "the burst, then about one a second"
    assert sum(r["count"] for r in aggregated) == len(limited)
    assert {(r["client_ip"], r["reason"], r["status"]) for r in aggregated} == {("127.0.0.1", "unknown_key", 401)}
    from workflow.serve.audit import AuditLog
    assert AuditLog(served.root / "audit.jsonl", (served.root / "audit.key").read_bytes()).verify()["records"] > 0


class EngineServer:
    """A small HTTP server in place of trtllm-serve that lists the model but fails completions with a plain-text 500,
    as engine servers do on a crash or an out-of-memory error."""

    def __init__(self) -> None:
        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

        async def crash(request):
            return PlainTextResponse("Internal Server Error: CUDA out of memory", 500)

        app = Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", crash, methods=["POST"]),
                                Route("/v1/completions", crash, methods=["POST"])])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the engine server", 30, every=0.1)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.mark.slow
def test_an_upstream_failure_is_a_502_in_the_gateways_shape_not_its_bytes_as_a_500(package, tmp_path):  # noqa: F811
    engine = EngineServer()
    served = Served(tmp_path / "front", None, {"upstream": f"http://127.0.0.1:{engine.port}"}, keys_dir=package.parent)
    try:
        served.wait_ready()
        with served.http("analyst") as client:
            for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", {"model": MODEL, "prompt": "1 +"})):
                for stream in (False, True):
                    answer = client.post(path, json=body | {"stream": stream})
                    assert answer.status_code == 502 and answer.headers["content-type"] == "application/json", answer.text
                    assert answer.json()["error"]["type"] == "upstream_error" and "500" in answer.json()["error"]["message"]
            engine.stop()
            gone = client.post("/v1/chat/completions", json=chat())
            assert gone.status_code == 502 and "did not answer" in gone.json()["error"]["message"]
            assert client.get("/v1/models").status_code == 502
        assert len(records(served, reason="upstream_error")) == 6
    finally:
        served.stop()
        engine.stop()


def test_headers_are_read_once_each_and_as_ascii():
    from workflow.serve.access import Denied
    from workflow.serve.guard import request_headers

    assert request_headers([(b"X-Forwarded-For", b"1.2.3.4"), (b"x-forwarded-for", b"5.6.7.8")]) == {"x-forwarded-for": "1.2.3.4, 5.6.7.8"}
    for raw, reason in (([(b"a", b"\xe9")], "bad_header"), ([(b"authorization", b"a"), (b"Authorization", b"b")], "repeated_header"),
                        ([(b"content-length", b"1"), (b"transfer-encoding", b"chunked")], "ambiguous_length")):
        with pytest.raises(Denied) as refused:
            request_headers(raw)
        assert refused.value.status == 400 and refused.value.reason == reason


def test_refusal_buckets_per_address_and_ipv6_by_slash_64():
    from workflow.serve.ratelimit import RefusalLimiter, address_key

    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1"
    now = [0.0]
    limiter = RefusalLimiter(per_minute=60, burst=2, max_addresses=100, clock=lambda: now[0])
    assert [limiter.admit("10.0.0.1") for _ in range(2)] == [0, 0] and limiter.admit("10.0.0.1") == pytest.approx(1.0)
    assert limiter.admit("10.0.0.2") == 0, "another address has its own bucket"
    limiter.count("10.0.0.1", "unknown_key", 401, "/v1/models")
    limiter.count("10.0.0.1", "unknown_key", 401, "/v1/models")
    [summary] = limiter.summaries()
    assert summary["count"] == 2 and summary["client_ip"] == "10.0.0.1" and summary["first"] <= summary["last"]
    assert summary["detail"] == {"endpoint": "/v1/models"} and limiter.summaries() == []
    for n in range(150):  # more addresses than max_addresses: the table stays bounded
        limiter.admit(f"10.1.0.{n}")
    assert len(limiter.buckets) == 100
