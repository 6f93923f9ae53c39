"""Canary checks against a running gateway: TLS version, the role matrix, generation correctness, latency SLO,
and the audit trail the checks themselves left. Each check says what it measured and what it needed.
"""

from __future__ import annotations

import socket
import ssl
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx2
import openai

from workflow.metrics import final_answer
from workflow.roles import ROLES
from workflow.serve.audit import AuditLog, AuditTampered
from workflow.serve.tls import client_context

# (method, path, body, permission): bodies that never change what is served, so every role can be tried.
# An allowed admin call gets 400 (body refused after the key and role were accepted), a forbidden one 403.
ENDPOINTS = [
    ("GET", "/v1/models", None, "infer"),
    ("POST", "/v1/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": "1 + 1"}], "max_tokens": 1}, "infer"),
    ("POST", "/v1/completions", {"model": "{model}", "prompt": "1 + 1 =", "max_tokens": 1}, "infer"),
    ("GET", "/v1/deployment", None, "view"),
    ("POST", "/admin/deploy", {}, "deploy"),
    ("POST", "/admin/undeploy", {}, "deploy"),
    ("GET", "/admin/limits", None, "adjust"),
    ("PUT", "/admin/limits", {}, "adjust"),
    ("POST", "/admin/audit/prune", None, "adjust"),
    ("GET", "/audit/events", None, "audit"),
    ("GET", "/audit/alerts", None, "audit"),
    ("GET", "/metrics", None, "monitor"),
]


@dataclass
class Check:
    name: str
    passed: bool
    value: object
    threshold: object
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def check_tls(host: str, port: int, ca: Path) -> Check:
    """The gateway speaks TLS 1.3 and refuses a client that offers at most TLS 1.2."""
    def handshake(context: ssl.SSLContext) -> str:
        with socket.create_connection((host, port), timeout=10) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
            return tls.version()

    modern = handshake(client_context(ca))
    try:
        old = handshake(client_context(ca, maximum=ssl.TLSVersion.TLSv1_2))
    except ssl.SSLError as err:
        old = f"refused ({err.reason})"
    passed = modern == "TLSv1.3" and old.startswith("refused")
    return Check("tls", passed, {"negotiated": modern, "tls1.2_client": old}, "TLSv1.3 only",
                 f"negotiated {modern}; a TLS 1.2 client was {old}")


def check_roles(base_url: str, ca: Path, keys: dict[str, str], model: str) -> Check:
    """Every role (and no key) against every endpoint: allowed where the matrix says so, refused elsewhere."""
    wrong, tried = [], 0
    with httpx2.Client(base_url=base_url, verify=client_context(ca), timeout=60) as client:
        for role in [*ROLES, None]:
            headers = {"Authorization": f"Bearer {keys[role]}"} if role else {}
            for method, path, body, permission in ENDPOINTS:
                if body is not None:
                    body = {k: (v.format(model=model) if isinstance(v, str) else v) for k, v in body.items()}
                status = client.request(method, path, json=body, headers=headers).status_code
                expected = 401 if role is None else (None if permission in ROLES[role].permissions else 403)
                ok = status == expected if expected else status not in (401, 403) and status < 500
                tried += 1
                if not ok:
                    wrong.append(f"{role or 'no key'} {method} {path}: got {status}, expected {expected or 'allowed'}")
    return Check("role_matrix", not wrong, f"{tried - len(wrong)}/{tried} as expected", "all",
                 "; ".join(wrong) or f"{len(ROLES) + 1} callers x {len(ENDPOINTS)} endpoints as the matrix says")


def openai_client(base_url: str, ca: Path, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, http_client=httpx2.Client(verify=client_context(ca), timeout=120))


def check_generation(client: openai.OpenAI, model: str, rows: list[dict], reference: list[dict], max_tokens: int) -> Check:
    """Served answers equal the engine's own greedy completions on held-out prompts (checked before packaging): the
    message fields, content and (for a thinking model) reasoning_content, as the gateway splits them."""
    served, correct = [], 0
    for row in rows:
        reply = client.chat.completions.create(model=model, messages=row["messages"][:-1], max_tokens=max_tokens, temperature=0)
        message = reply.choices[0].message
        fields = {"content": message.content}
        if getattr(message, "reasoning_content", None) is not None:
            fields["reasoning_content"] = message.reasoning_content
        served.append(fields)
        correct += answer_of(fields) == row["answer"].strip()
    differ = [i for i, (a, b) in enumerate(zip(served, reference, strict=True)) if a != b]
    detail = (f"{len(rows) - len(differ)}/{len(rows)} served completions equal the engine's; accuracy {correct / len(rows):.3f}"
              + (f"; first difference at prompt {differ[0]}: served {str(served[differ[0]])[:120]!r}, "
                 f"engine {str(reference[differ[0]])[:120]!r}" if differ else ""))
    return Check("generation", not differ, {"equal": len(rows) - len(differ), "accuracy": correct / len(rows)},
                 {"equal": len(rows)}, detail)


def answer_of(fields: dict) -> str | None:
    """The final answer: the content after the reasoning (split), or after the inline think block (raw)."""
    if "reasoning_content" in fields:
        return (fields["content"] or "").strip()
    return final_answer(fields["content"] or "", opens_think=False)


def check_latency(client: openai.OpenAI, model: str, rows: list[dict], concurrency: int, requests: int, output_len: int,
                  slo_p95_s: float) -> Check:
    """Streaming requests at the benchmark's highest concurrency: p95 latency within the SLO."""
    def one(i: int) -> tuple[float, float]:
        start, first = time.perf_counter(), None
        stream = client.chat.completions.create(model=model, messages=rows[i % len(rows)]["messages"][:-1],
                                                max_tokens=output_len, temperature=0, stream=True)
        for _ in stream:
            first = first or time.perf_counter() - start
        return time.perf_counter() - start, first or 0.0

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        timings = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - began
    latencies = sorted(t for t, _ in timings)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    ttft = statistics.median(f for _, f in timings)
    return Check("latency", p95 <= slo_p95_s, {"p95_s": p95, "p50_s": statistics.median(latencies), "ttft_p50_s": ttft,
                                              "requests_per_s": requests / wall, "concurrency": concurrency},
                 {"p95_s": slo_p95_s}, f"p95 {p95:.3f} s at concurrency {concurrency} ({requests} requests); SLO {slo_p95_s} s")


def check_audit(log: AuditLog, calls: int, secret_text: str) -> Check:
    """The checks' own requests are in the audit log, the chain verifies (with its key), and no prompt text was written."""
    path = log.path
    try:
        result = log.verify()
    except AuditTampered as err:
        return Check("audit", False, None, "verifies", str(err))
    leaked = secret_text in path.read_text()
    passed = result["records"] >= calls and not leaked
    return Check("audit", passed, {"records": result["records"], "head": result["head"], "prompt_text_found": leaked},
                 {"records_at_least": calls, "prompt_text_found": False},
                 f"{result['records']} chained records verified (>= {calls} canary calls); prompt text in log: {leaked}")
