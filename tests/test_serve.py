"""The gateway, run for real: uvicorn over TLS 1.3 serving a package built from the tiny model, called with the
official openai client, httpx and raw TLS sockets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest
import uvicorn
import yaml
from transformers import AutoTokenizer

from workflow.config import load
from workflow.engine import onnxruntime
from workflow.finetune.launch import free_port
from workflow.package import archive
from workflow.package.kms import LocalKeyFile
from workflow.serve.access import KeyStore
from workflow.serve.audit import AuditLog
from workflow.serve.deployments import Deployments
from workflow.serve.protocol import BadRequest
from workflow.serve.server import build
from workflow.serve.tls import client_context
from workflow.wait import wait_for

MODEL = "tiny-model"


class Served:
    """A gateway process on a loopback port, with one key per role."""

    def __init__(self, root: Path, package: Path | None, overrides: dict | None = None, env: dict | None = None,
                 keys_dir: Path | None = None, model_dir: Path | None = None) -> None:
        """A gateway started on `package`, or on `model_dir` (the folder a package was opened into), or on nothing."""
        self.root, self.port = root, free_port()
        keys_dir = keys_dir or package.parent
        gateway = {
            "port": self.port, "api_keys": str(root / "api_keys.json"), "tls": {"dir": str(root.parent / "tls")},
            "audit": {"path": str(root / "audit.jsonl"), "key_file": str(root / "audit.key")}, "trusted_proxies": ["127.0.0.1/32"],
            "allow": {"admin": ["127.0.0.0/8"], "analyst": ["127.0.0.0/8", "10.0.0.0/8"], "auditor": ["127.0.0.0/8"]},
            "limits": {"max_body_bytes": 4096, "max_prompt_tokens": 64, "max_tokens": 32},
            "package_root": str(root / "packages"),
            "rate_limits": {role: {"requests_per_minute": 60000, "burst": 1000} for role in ("admin", "analyst", "auditor")},
        } | (overrides or {})
        self.packages = root / "packages"
        self.packages.mkdir(parents=True, exist_ok=True)
        config = {"package": {"model_name": MODEL, "signing_key": str(keys_dir / "signing.pem"),
                              "kms": {"local": {"key_file": str(keys_dir / "kek.bin")}}},
                  "rollout": {"gateway": gateway}}
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        self.config = load(root / "config.yaml")
        store = KeyStore(root / "api_keys.json")
        self.keys = {role: store.add(role, role) for role in ("admin", "analyst", "auditor")}
        command = [sys.executable, "-m", "workflow.serve", "--config", str(root / "config.yaml"), "start"]
        given = ["--package", str(package)] if package else ["--model-dir", str(model_dir)] if model_dir else []
        self.process = subprocess.Popen(command + given,
                                        stdout=open(root / "gateway.log", "w"), stderr=subprocess.STDOUT, env=env)
        self.url, self.ca = f"https://127.0.0.1:{self.port}", root.parent / "tls" / "ca.pem"

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, (self.root / "gateway.log").read_text()
            try:
                return self.http().get("/readyz").status_code == 200
            except (httpx2.TransportError, FileNotFoundError, ssl.SSLError):
                return False

        wait_for(ready, f"the gateway to be ready; its log: {self.root / 'gateway.log'}", timeout, every=0.3)

    def http(self, role: str | None = None, **headers) -> httpx2.Client:
        if role:
            headers["Authorization"] = f"Bearer {self.keys[role]}"
        return httpx2.Client(base_url=self.url, verify=client_context(self.ca), headers=headers, timeout=60)

    def openai(self, role: str = "analyst") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[role], http_client=self.http())

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


# uvicorn re-raises SIGTERM after its graceful shutdown, so a clean stop ends by that signal.
STOPPED = (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def package(tiny_base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    engine = root / "engine"
    onnxruntime.build(tiny_base, engine, "bf16", "cpu", 32, 4, "test")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_base / name).exists() and not (engine / name).exists():
            (engine / name).write_bytes((tiny_base / name).read_bytes())
    archive.pack(engine, root / "model.ftpkg", LocalKeyFile(root / "kek.bin", create=True),
                 archive.load_signing_key(root / "signing.pem"), {}, 1 << 20)
    return root / "model.ftpkg"


@pytest.fixture(scope="module")
def gateway(package):
    served = Served(package.parent / "gateway", package)
    served.wait_ready()
    yield served
    assert served.stop() in STOPPED


def test_a_pod_serves_the_folder_its_init_container_opened_and_records_the_package(package, tmp_path, shm):
    """What a Kubernetes pod does: the init container opens the package onto memory (`workflow.package open`), the
    gateway starts on that folder (`--model-dir`), serves it, names the package it came from and records it in the
    audit chain as served, which raises the anti-rollback floor of every replica (test_audit_attacks.py)."""
    keys = package.parent
    opened = archive.open_package(package, archive.load_signing_key(keys / "signing.pem").public_key(),
                                  LocalKeyFile(keys / "kek.bin"), into=shm / "model")
    served = Served(tmp_path / "pod", None, keys_dir=keys, model_dir=opened)
    try:
        served.wait_ready()
        with served.http("analyst") as client:
            assert client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
            assert client.get("/v1/deployment").json()["package"]["sha256"] == archive.digest(package)
    finally:
        assert served.stop() in STOPPED
    audit = AuditLog(tmp_path / "pod" / "audit.jsonl", (tmp_path / "pod" / "audit.key").read_bytes())
    assert Deployments(audit).state["floor"] == archive.opened_from(opened)["created"] != ""


def chat(text: str = "What is 2 + 3?", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8} | extra


def said(message) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of an answer's message: the tiny model's template opens a think block, so what it
    says is reasoning (and content null) until it writes </think>."""
    return getattr(message, "reasoning_content", None) or None, message.content or None


def streamed_said(chunks) -> tuple[str | None, str | None]:
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    return reasoning or None, content or None


def test_openai_client_plain_and_streaming(gateway):
    client = gateway.openai()
    assert [m.id for m in client.models.list().data] == [MODEL]
    seeded = {"temperature": 1.0, "seed": 3}  # the tiny model's greedy text is blank; sampled, it says something
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=12, **seeded)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                            max_tokens=12, stream=True, stream_options={"include_usage": True}, **seeded)
    chunks = list(stream)
    assert streamed_said(chunks) == said(plain.choices[0].message) != (None, None)  # the same seed: the same text either way
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_concurrent_streams_are_batched_and_each_gets_its_own_tokens(gateway):
    """The in-process engine decodes concurrent requests together (continuous batching); every stream still gets
    its own tokens, as they come, equal to what the same prompt gets alone."""
    client = gateway.openai()
    questions = [f"What is {a} + {b}?" for a, b in ((2, 3), (11, 4), (7, 8), (20, 9), (1, 1), (6, 30))]
    seeded = {"temperature": 1.0, "seed": 1}  # the tiny model's greedy text is blank; sampled, it says something
    alone = [said(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=16,
                                                 **seeded).choices[0].message) for q in questions]

    def streamed(question: str) -> tuple[tuple, int]:
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                     max_tokens=16, stream=True, **seeded))
        return streamed_said(chunks), len(chunks)

    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(streamed, questions))
    assert [text for text, _ in together] == alone
    assert all(count > 2 for _, count in together), "tokens arrive as several events, not one"
    text = client.completions.create(model=MODEL, prompt="2 + 3 =", max_tokens=5)
    assert text.usage.prompt_tokens > 0 and text.choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="2 + 3 =", max_tokens=5, stream=True)) == text.choices[0].text


def test_tls_1_2_is_refused_at_the_handshake(gateway):
    def handshake(context):
        with socket.create_connection(("127.0.0.1", gateway.port)) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.version()

    assert handshake(client_context(gateway.ca)) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        handshake(client_context(gateway.ca, maximum=ssl.TLSVersion.TLSv1_2))


# The access matrix, written out: True = the role may call it (it may still get a 4xx for its body).
MATRIX = {
    ("GET", "/v1/models"): {"analyst"},
    ("POST", "/v1/chat/completions"): {"analyst"},
    ("POST", "/v1/completions"): {"analyst"},
    ("GET", "/v1/deployment"): {"admin", "analyst", "auditor"},
    ("POST", "/admin/deploy"): {"admin"},
    ("POST", "/admin/undeploy"): {"admin"},
    ("GET", "/admin/limits"): {"admin"},
    ("PUT", "/admin/limits"): {"admin"},
    ("POST", "/admin/audit/prune"): {"admin"},
    ("GET", "/audit/events"): {"auditor"},
    ("GET", "/audit/alerts"): {"auditor"},
    ("GET", "/metrics"): {"auditor"},
}


def test_every_role_against_every_endpoint(gateway):
    bodies = {"/v1/chat/completions": chat(max_tokens=1), "/v1/completions": {"model": MODEL, "prompt": "1", "max_tokens": 1},
              "/admin/deploy": {}, "/admin/undeploy": {}, "/admin/limits": {}}
    for role in ("admin", "analyst", "auditor", None):
        with gateway.http(role) as client:
            for (method, path), allowed in MATRIX.items():
                status = client.request(method, path, json=bodies.get(path) if method != "GET" else None).status_code
                if role is None:
                    assert status == 401, (method, path)
                elif role in allowed:
                    assert status in (200, 202, 400), (role, method, path, status)  # 400: admin's empty deploy bodies
                else:
                    assert status == 403, (role, method, path, status)
    assert gateway.http().get("/healthz").status_code == 200 and gateway.http().get("/readyz").status_code == 200


def test_ip_allow_lists_follow_forwarded_for_only_from_a_trusted_proxy(gateway):
    # The test connects from 127.0.0.1, configured as a trusted proxy, so X-Forwarded-For names the client.
    with gateway.http("analyst", **{"X-Forwarded-For": "10.1.2.3"}) as inside:
        assert inside.post("/v1/chat/completions", json=chat()).status_code == 200
    with gateway.http("analyst", **{"X-Forwarded-For": "10.1.2.3, 203.0.113.9"}) as outside:
        answer = outside.post("/v1/chat/completions", json=chat())
        assert answer.status_code == 403 and "203.0.113.9 is not on this key's address allow-list" in answer.json()["error"]["message"]
    with gateway.http("auditor", **{"X-Forwarded-For": "10.1.2.3"}) as auditor_away:
        assert auditor_away.get("/audit/events").status_code == 403  # auditors only from loopback
    with gateway.http("auditor") as auditor:
        found = auditor.get("/audit/alerts").json()["alerts"]
    assert {"outside_allow_list"} <= {a["kind"] for a in found}
    assert any(a.get("client_ip") == "203.0.113.9" for a in found)


def test_untrusted_peer_cannot_spoof_forwarded_for(package, tmp_path):
    served = Served(tmp_path / "untrusted", package, {"trusted_proxies": [], "allow": {"analyst": ["10.0.0.0/8"]}})
    try:
        served.wait_ready()
        with served.http("analyst", **{"X-Forwarded-For": "10.1.2.3"}) as spoofing:
            answer = spoofing.post("/v1/chat/completions", json=chat())
        assert answer.status_code == 403 and "127.0.0.1 is not on this key's address allow-list" in answer.json()["error"]["message"]
    finally:
        served.stop()


def test_a_revoked_key_is_refused_at_once_and_an_expired_key_too(gateway):
    def keys(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "workflow.serve", "--config", str(gateway.root / "config.yaml"), "keys", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    temporary = keys("add", "--id", "temp-analyst", "--role", "analyst")
    with httpx2.Client(base_url=gateway.url, verify=client_context(gateway.ca), timeout=60,
                       headers={"Authorization": f"Bearer {temporary}"}) as client:
        assert client.get("/v1/models").status_code == 200
        keys("revoke", "--id", "temp-analyst")  # the gateway keeps running: no restart
        refused = client.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unknown_key"
    expired = keys("add", "--id", "expired-analyst", "--role", "analyst", "--expires-days", "-0.001")
    answer = httpx2.get(f"{gateway.url}/v1/models", verify=client_context(gateway.ca), headers={"Authorization": f"Bearer {expired}"})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "expired_key"
    assert "expired-analyst\tanalyst" in keys("list")
    keys("revoke", "--id", "expired-analyst")


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(gateway):
    with gateway.http("analyst") as client:
        cases = {
            413: client.post("/v1/chat/completions", json=chat("x" * 5000)),
            400: client.post("/v1/chat/completions", json=chat(max_tokens=33)),
            404: client.post("/v1/chat/completions", json=chat() | {"model": "gpt-4"}),
        }
        assert "max_body_bytes = 4096" in cases[413].json()["error"]["message"]
        assert "max_tokens 33 is over the gateway's limit of 32" in cases[400].json()["error"]["message"]
        assert "'gpt-4' is not served here" in cases[404].json()["error"]["message"]
        long_prompt = client.post("/v1/chat/completions", json=chat("1 + 1 = 2. " * 40))
        assert long_prompt.status_code == 400 and "over the gateway's limit of 64" in long_prompt.json()["error"]["message"]
        refused = client.post("/v1/chat/completions", json=chat(logprobs=True))
        assert refused.status_code == 400 and refused.json()["error"]["message"].startswith("logprobs = true is not supported")
        broken = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 400
        missing = client.post("/v1/chat/completions", json={"model": MODEL})
        assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]
        for path, body in (("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
                           ("/v1/completions", b'{"model": "%s", "prompt": "\\udfff"}')):
            surrogate = client.post(path, content=body.replace(b"%s", MODEL.encode()), headers={"content-type": "application/json"})
            assert surrogate.status_code == 400 and "lone surrogate" in surrogate.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json=chat()).status_code == 200


def stored(package: Path, root: Path) -> str:
    """Put a package in a gateway's package root under its digest, as the backup rule does; its digest."""
    digest = archive.digest(package)
    shutil.rmtree(root / digest, ignore_errors=True)
    shutil.copytree(package, root / digest)
    return digest


def test_admin_adjusts_limits_undeploys_and_redeploys_refusing_a_tampered_package(gateway, package, tmp_path):
    admin, analyst = gateway.http("admin"), gateway.http("analyst")
    try:
        assert admin.put("/admin/limits", json={"max_tokens": 4}).json()["max_tokens"] == 4
        assert analyst.post("/v1/chat/completions", json=chat(max_tokens=5)).status_code == 400
        assert admin.put("/admin/limits", json={"max_tokens": -1}).status_code == 400
        served = analyst.get("/v1/deployment").json()["package"]["sha256"]
        assert admin.post("/admin/undeploy", json={"package_sha256": "0" * 64}).status_code == 409
        assert admin.post("/admin/undeploy", json={"package_sha256": served}).status_code == 200
        assert gateway.http().get("/readyz").status_code == 503
        assert analyst.post("/v1/chat/completions", json=chat()).status_code == 503
        digest = stored(package, gateway.packages)  # a copy whose ciphertext is then altered: same signed manifest
        blob = next(p for p in sorted((gateway.packages / digest).rglob("*")) if p.is_file() and p.stat().st_size > 10000)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 1
        blob.write_bytes(bytes(data))
        assert admin.post("/admin/deploy", json={"package_sha256": digest}).status_code == 202
        wait_for(lambda: "Tampered" in gateway.http().get("/readyz").json().get("reason", ""), "the refusal", 30, every=0.2)
        reason = gateway.http().get("/readyz").json()["reason"]
        assert reason == "load failed (TamperedPackage); see the gateway log", "the kind only: no paths or key ids"
        stored(package, gateway.packages)
        assert admin.post("/admin/deploy", json={"package_sha256": digest}).status_code == 202
        gateway.wait_ready(60)
        assert analyst.post("/v1/chat/completions", json=chat(max_tokens=4)).status_code == 200
    finally:
        admin.put("/admin/limits", json={"max_tokens": 32})


def test_deploy_takes_a_digest_from_the_package_root_one_load_at_a_time_and_refuses_rollbacks(package, tmp_path):
    """An admin key cannot load a path of its choosing, pile loads into /dev/shm, or bring back an old signed package."""
    engine, kms = package.parent / "engine", LocalKeyFile(package.parent / "kek.bin")
    signing = archive.load_signing_key(package.parent / "signing.pem")
    older, newer = tmp_path / "older.ftpkg", tmp_path / "newer.ftpkg"
    for made in (older, newer):  # both signed after `package`, `older` before `newer`
        archive.pack(engine, made, kms, signing, {}, 1 << 20)
    served = Served(tmp_path / "gateway", package)
    try:
        served.wait_ready()
        first, old, new = (stored(p, served.packages) for p in (package, older, newer))
        admin = served.http("admin")
        assert admin.post("/admin/deploy", json={"package": str(newer)}).status_code == 400, "no paths, only digests"
        for sneaky in ("../" * 6 + "etc", str(newer), first.upper(), first[:63]):
            assert admin.post("/admin/deploy", json={"package_sha256": sneaky}).status_code == 400
        assert admin.post("/admin/deploy", json={"package_sha256": "f" * 64}).status_code == 404

        answers = []
        rush = [threading.Thread(target=lambda: answers.append(admin.post("/admin/deploy", json={"package_sha256": new}).status_code))
                for _ in range(4)]
        for thread in rush:
            thread.start()
        for thread in rush:
            thread.join()
        assert sorted(answers) == [202, 409, 409, 409], "one load at a time"
        wait_for(lambda: served.http("analyst").get("/v1/deployment").json()["package"].get("sha256") == new, "the newer package", 60)

        refused = admin.post("/admin/deploy", json={"package_sha256": old})
        assert refused.status_code == 409 and "older package" in refused.json()["error"]["message"]
        assert admin.post("/admin/deploy", json={"package_sha256": old, "rollback": True}).status_code == 409, \
            "a rollback only to the package served just before"
        assert admin.post("/admin/deploy", json={"package_sha256": first, "rollback": True}).status_code == 202
        wait_for(lambda: served.http("analyst").get("/v1/deployment").json()["package"].get("sha256") == first, "the rollback", 60)
    finally:
        assert served.stop() in STOPPED
    audit = AuditLog(served.root / "audit.jsonl", (served.root / "audit.key").read_bytes(), writer=True)
    try:
        after_restart = Deployments(audit)  # what a restarted gateway rebuilds from its verified chain
        assert [h["sha256"] for h in after_restart.state["history"]][-2:] == [new, first]
        created = archive.signed_manifest(older, signing.public_key())[1]["created"]
        with pytest.raises(BadRequest, match="older package"):
            after_restart.check(old, created, rollback=False)
    finally:
        audit.close()


def test_audit_log_records_every_request_without_text_and_metrics_count_them(gateway):
    for _ in range(5):
        assert gateway.http(Authorization="Bearer ftk-wrong").get("/v1/models").status_code == 401
    with gateway.http("auditor") as auditor:
        events = auditor.get("/audit/events", params={"key_id": "analyst", "endpoint": "/v1/chat/completions"}).json()["events"]
        alerts = auditor.get("/audit/alerts").json()["alerts"]
        metrics = auditor.get("/metrics").text
    assert events and all(e["role"] == "analyst" and e["latency_ms"] > 0 for e in events)
    assert any(e["completion_tokens"] > 0 for e in events)
    assert {"denied_burst"} <= {a["kind"] for a in alerts}
    log_text = Path(gateway.root / "audit.jsonl").read_text()
    assert "What is 2 + 3?" not in log_text and gateway.keys["analyst"] not in log_text
    assert 'ft2prod_gateway_requests_total{endpoint="/v1/chat/completions",role="analyst",status="200"}' in metrics
    assert 'ft2prod_gateway_denied_total{reason="unknown_key"}' in metrics
    assert "ft2prod_gateway_request_seconds_bucket" in metrics and "ft2prod_gateway_ready 1.0" in metrics
    done = subprocess.run([sys.executable, "-m", "workflow.serve", "--config", str(gateway.root / "config.yaml"), "audit", "verify"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "audit log verified" in done.stdout


@pytest.mark.slow  # a gateway process started and stopped
def test_sigterm_finishes_the_request_in_flight(package, tmp_path):
    served = Served(tmp_path / "graceful", package, {"limits": {"max_body_bytes": 4096, "max_prompt_tokens": 64, "max_tokens": 4000}})
    served.wait_ready()
    too_long = served.http("analyst").post("/v1/completions", json={"model": MODEL, "prompt": "1 + 1 =", "max_tokens": 4000})
    assert too_long.status_code == 400 and "over the model's context length of " in too_long.json()["error"]["message"]
    body = {"model": MODEL, "prompt": "1 + 1 =", "max_tokens": 500, "stream": True}
    with served.http("analyst") as client, client.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        served.process.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        rest = [line for line in lines if line.startswith("data: ")]
        print(f"stream went on {time.perf_counter() - signalled:.2f} s after SIGTERM, {len(rest)} more events")
    assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    assert served.process.wait(timeout=60) in STOPPED


@pytest.mark.slow  # two gateway processes
def test_forwarding_to_an_upstream_openai_compatible_server(package, tmp_path):
    # The upstream: this gateway's own app on plain HTTP, as trtllm-serve or vLLM would listen inside a pod.
    upstream_root = tmp_path / "upstream"
    upstream_root.mkdir()
    (upstream_root / "config.yaml").write_text(yaml.safe_dump({
        "package": {"model_name": MODEL, "signing_key": str(package.parent / "signing.pem"),
                    "kms": {"local": {"key_file": str(package.parent / "kek.bin")}}},
        "rollout": {"gateway": {"api_keys": str(upstream_root / "keys.json"), "audit": {"path": str(upstream_root / "audit.jsonl"),
                                                                                                 "key_file": str(upstream_root / "audit.key")}}}}))
    engine_key = KeyStore(upstream_root / "keys.json").add("gateway", "analyst")
    app, engine = build(load(upstream_root / "config.yaml"), str(package))
    received = []

    async def recording(scope, receive, send):  # keeps the bodies the engine server is sent
        async def body():
            message = await receive()
            received.append(message.get("body", b""))
            return message
        return await app(scope, body if scope["type"] == "http" and scope["method"] == "POST" else receive, send)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(recording, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    served = Served(tmp_path / "front", None, {"upstream": f"http://127.0.0.1:{port}", "upstream_key_env": "ENGINE_KEY"},
                    env={**os.environ, "ENGINE_KEY": engine_key}, keys_dir=package.parent)
    try:
        served.wait_ready()
        client = served.openai()
        plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=6)
        streamed = streamed_said(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=6, stream=True))
        assert streamed == said(plain.choices[0].message)
        assert served.http("analyst").post("/v1/chat/completions", json=chat(max_tokens=99)).status_code == 400
        received.clear()
        sneaky = chat(ignore_eos=True, min_tokens=30, best_of=4)
        del sneaky["max_tokens"]
        assert served.http("analyst").post("/v1/chat/completions", json=sneaky).status_code == 200
        forwarded = json.loads(received[-1])
        assert forwarded["max_tokens"] == 32, "the gateway's limit applies upstream too"
        assert not {"ignore_eos", "min_tokens", "best_of"} & set(forwarded)
        sampling = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 5, "stop": ["\n\n"], "presence_penalty": 0.5,
                    "frequency_penalty": 0.1, "logit_bias": {"5": -100.0}}
        assert served.http("analyst").post("/v1/chat/completions", json=chat(**sampling, user="u1")).status_code == 200
        forwarded = json.loads(received[-1])
        assert {name: forwarded.get(name) for name in sampling} == sampling, "the validated sampling fields go upstream"
        assert "user" not in forwarded
        received.clear()
        refused = served.http("analyst").post("/v1/chat/completions", json=chat(logprobs=True, temperature=3))
        assert refused.status_code == 400 and not received, "refused before anything is forwarded"
        assert served.http("admin").post("/admin/deploy", json={"package_sha256": archive.digest(package)}).status_code == 409
        front_log = (served.root / "audit.jsonl").read_text()
        assert '"completion_tokens":' in front_log and engine.audit.verify()["records"] >= 2
    finally:
        served.stop()
        server.should_exit = True
        thread.join(timeout=30)


def test_sampling_with_the_official_client(gateway, tiny_base):
    """temperature, top_p, seed, stop and include_usage as OpenAI clients send them (LangChain's 0.7, DeepSeek's
    0.6 / 0.95 for R1 models); what the gateway does not serve is a 400 naming the field."""
    client = gateway.openai()
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 16}
    for sampling in ({"temperature": 0.7}, {"temperature": 0.6, "top_p": 0.95}, {"temperature": 1.0, "extra_body": {"top_k": 5}}):  # vLLM's extension, as clients send it
        answer = client.chat.completions.create(**ask, **sampling)
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0
    seeded = [said(client.chat.completions.create(**ask, temperature=1.5, seed=seed).choices[0].message) for seed in (7, 7, 8, 9)]
    assert seeded[0] == seeded[1], "the same seed, the same answer"
    assert len({seeded[0], seeded[2], seeded[3]}) == 3, "other seeds, other answers at temperature 1.5"
    assert client.chat.completions.create(**ask, max_completion_tokens=3).usage.completion_tokens <= 3

    text = {"model": MODEL, "prompt": "2 + 3 =", "max_tokens": 16, "temperature": 1.0, "seed": 5}
    full = client.completions.create(**text).choices[0]
    stop = full.text.strip()[len(full.text.strip()) // 2:][:3]
    assert stop.strip(), f"a visible stop string from {full.text!r}"
    cut = client.completions.create(**text, stop=[stop, "never generated"]).choices[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    streamed = list(client.completions.create(**text, stop=stop, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text
    assert streamed[-1].choices == [] and streamed[-1].usage.prompt_tokens > 0, "include_usage: a last chunk with the usage"

    five = AutoTokenizer.from_pretrained(tiny_base).convert_tokens_to_ids("5")
    forced = client.completions.create(model=MODEL, prompt="2 + 3 =", max_tokens=4, logit_bias={str(five): 100})
    assert forced.choices[0].text == "5555", "logit_bias is applied"
    for refused, named in (({"logprobs": True}, "logprobs"), ({"n": 2}, "n"), ({"response_format": {"type": "json_object"}}, "response_format")):
        with pytest.raises(openai.BadRequestError, match=rf"{named} = .* is not supported"):
            client.chat.completions.create(**ask, **refused)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(**ask, temperature=2.5)


def test_seeded_requests_in_one_batch_do_not_perturb_each_other(gateway):
    """Each request draws from its own generator: a seeded request gets the same answer alone and batched with
    others that sample."""
    client = gateway.openai()

    def ask(question: str, seed: int | None) -> tuple:
        return said(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                   max_tokens=24, temperature=1.2, seed=seed).choices[0].message)

    alone = ask("What is 6 + 7?", 11)
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda i: ask("What is 6 + 7?" if i % 2 == 0 else f"What is {i} + 1?", 11 if i % 2 == 0 else None), range(6)))
    assert together[0] == together[2] == together[4] == alone
