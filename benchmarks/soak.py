"""A bounded soak of the gateway on loopback: well-formed load at fixed concurrency with slow clients, aborted streams
and a greedy key mixed in, then the figures a serving team signs off on.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--concurrency 32] [--keys 8] [--slow 250] [--json soak.json]

Builds a model of the embedded default's shape (the bootstrap Llama, briefly pretrained: its answers do not matter
here), its ONNX Runtime GenAI bf16 engine and package (local key file, fresh signing key), and serves the package
in-process with `python -m workflow.serve start` (TLS 1.3, the default deadlines, rate limits and max_connections).
For --minutes it runs at once:

- --concurrency well-formed clients sharing --keys analyst keys (as a team's services share their keys), every key
  kept by its clients within the rate the deployment gives analysts (the embedded default's rollout.gateway.rate_limits,
  requests spread evenly, none above it): chat completions plain and streamed, and text completions; every
  --abort-every-th request of each is a streamed chat completion reset by the client after its first event;
- --slow slow clients (benchmarks/slow_clients.py), each repeating: TLS handshake then silence; headers one byte at a
  time; headers announcing a body that never comes, with a key (408 expected) and without (401 expected);
- one greedy admin key reading /admin/limits --greedy-rps times a second, above the admin rate (429 expected).

Every client is on loopback, one address: past the per-address refusal bucket (rollout.gateway.refusal_limits) the
expected 401/408/429 become 429 too_many_refusals, counted in aggregated audit records. Then it prints requests,
errors by class among well-formed requests (2xx/4xx/5xx/transport) and the expected refusals apart, requests per key,
latency percentiles, the gateway's resident memory (at load start, after warm-up, at the end, peak), and, after the
gateway's graceful stop (which writes the last aggregated records), audit records against requests sent (one record
each, or a share of an aggregated one) and `python -m workflow.serve audit verify`. tests/test_soak.py runs a
one-minute version and asserts on the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx2
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slow_clients  # the misbehaving clients, beside this script

from workflow.config import RateLimits
from workflow.finetune.launch import free_port
from workflow.serve.access import KeyStore
from workflow.serve.tls import client_context

MODEL = "soak-model"
QUESTIONS = ["What is 2 + 3?", "What is 12 - 7?", "Add 4 and 9.", "What is 6 times 7?", "Halve 18."]


def build_package(work: Path, layers: int = 4) -> Path:
    """The embedded default's bootstrap model shape, its bf16 CPU engine, packed; the keys beside the package."""
    from workflow.bootstrap.model import BootstrapConfig, make_base_model
    from workflow.engine import onnxruntime
    from workflow.package import archive
    from workflow.package.kms import LocalKeyFile

    base, engine = work / "base", work / "engine"
    make_base_model(BootstrapConfig(num_layers=layers, pretrain_rows=200, pretrain_steps=2), base)
    onnxruntime.build(base, engine, "bf16", "cpu", 32, 4, "soak", work / "build.log")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / name).exists() and not (engine / name).exists():
            (engine / name).write_bytes((base / name).read_bytes())
    archive.pack(engine, work / "model.ftpkg", LocalKeyFile(work / "kek.bin", create=True),
                 archive.load_signing_key(work / "signing.pem"), {}, 1 << 20)
    return work / "model.ftpkg"


class Gateway:
    """`python -m workflow.serve start` on a loopback port, with keys made for the soak."""

    def __init__(self, work: Path, package: Path, concurrency: int, keys: int, overrides: dict) -> None:
        self.work, self.port = work, free_port()
        keys_dir = package.parent
        gateway = {"port": self.port, "api_keys": str(work / "api_keys.json"), "tls": {"dir": str(work / "tls")},
                   "audit": {"path": str(work / "audit.jsonl")},
                   "limits": {"max_body_bytes": 4096, "max_prompt_tokens": 64, "max_tokens": 32}} | overrides
        config = {"package": {"model_name": MODEL, "signing_key": str(keys_dir / "signing.pem"),
                              "kms": {"local": {"key_file": str(keys_dir / "kek.bin")}}}, "rollout": {"gateway": gateway}}
        work.mkdir(parents=True, exist_ok=True)
        self.config = work / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        store = KeyStore(work / "api_keys.json")
        self.keys = [store.add(f"soak-{i}", "analyst") for i in range(keys)]
        self.clients = [self.keys[i % keys] for i in range(concurrency)]
        self.slow, self.greedy, self.auditor = store.add("slow", "analyst"), store.add("greedy", "admin"), store.add("auditor", "auditor")
        self.log = work / "gateway.log"
        self.process = subprocess.Popen([sys.executable, "-m", "workflow.serve", "--config", str(self.config), "start",
                                         "--package", str(package)], stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.url, self.ca = f"https://127.0.0.1:{self.port}", work / "tls" / "ca.pem"

    def http(self, key: str | None = None) -> httpx2.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx2.Client(base_url=self.url, verify=client_context(self.ca), headers=headers, timeout=120)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.log.read_text()[-3000:]}")
            try:
                with self.http() as client:
                    if client.get("/readyz").status_code == 200:
                        return
            except (httpx2.TransportError, FileNotFoundError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the gateway was not ready in {timeout} s; its log: {self.log}")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def request_records(self) -> int:
        """Requests the audit log accounts for so far: a record each, or a count in an aggregated record."""
        return sum(self.audit_counts().values())

    def audit_counts(self) -> dict[str, int]:
        """{"own": requests with a record of their own, "aggregated": requests counted in aggregated records}."""
        counts, path = {"own": 0, "aggregated": 0}, self.work / "audit.jsonl"
        if path.exists():
            with open(path) as handle:
                for line in handle:
                    record = json.loads(line)
                    if record.get("event") == "request":
                        counts["own"] += 1
                    elif record.get("event") == "refused.aggregate":
                        counts["aggregated"] += record["count"]
        return counts

    def settled_records(self, still_s: float = 3, timeout: float = 120) -> int:
        """Request records once none has been added for still_s: a record is written after the answer's last byte,
        and a stream its client reset ends on the server only when it next writes."""
        records, still_since, began = self.request_records(), time.monotonic(), time.monotonic()
        while time.monotonic() - still_since < still_s and time.monotonic() - began < timeout:
            time.sleep(0.5)
            now = self.request_records()
            if now != records:
                records, still_since = now, time.monotonic()
        return records

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=90)


def refusal(outcome: slow_clients.Outcome) -> str:
    """"408", "401", or "429 <code>" (rate_limited for a key, too_many_refusals for the address)."""
    if outcome.status != 429:
        return str(outcome.status)
    try:
        return f"429 {json.loads(outcome.body)['error']['code']}"
    except (ValueError, KeyError):
        return "429"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def status_class(status) -> str:
    return f"{status // 100}xx" if isinstance(status, int) else "transport"


class Pacer:
    """Keeps one key's requests, from all its clients, within requests_per_minute, spread evenly (no burst used)."""

    def __init__(self, per_minute: float) -> None:
        self.interval, self.next, self.lock = 60.0 / per_minute, 0.0, threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            slot = max(now, self.next)
            self.next = slot + self.interval
        time.sleep(slot - now)


def soak(package: Path, work: Path, seconds: float, concurrency: int = 32, keys: int = 8, slow: int = 250,
         abort_every: int = 10, greedy_rps: float = 20, overrides: dict | None = None) -> dict:
    """Run the soak against a gateway serving `package` (keys beside it); the figures as a dict."""
    gateway = Gateway(work, package, concurrency, keys, overrides or {})
    try:
        gateway.wait_ready()
        return _drive(gateway, seconds, concurrency, slow, abort_every, greedy_rps)
    finally:
        if gateway.process.poll() is None:
            gateway.stop()


def _drive(gateway: Gateway, seconds: float, concurrency: int, slow: int, abort_every: int, greedy_rps: float) -> dict:
    lock = threading.Lock()
    well_formed: list[tuple[str, object, float, str]] = []  # (kind, status or transport error, seconds, key)
    aborted: list[slow_clients.Outcome] = []
    misbehaved: list[slow_clients.Outcome] = []
    greedy: list[object] = []
    rss: list[tuple[float, float]] = []
    records_before = gateway.settled_records(still_s=1)
    analyst_rate = RateLimits().analyst.requests_per_minute  # the embedded default's, which the soak's gateway keeps
    pacers = {key: Pacer(analyst_rate) for key in gateway.keys}
    load_before = os.getloadavg()
    began = time.monotonic()
    end = began + seconds

    def client(index: int) -> None:
        key, rng = gateway.clients[index], random.Random(index)
        with gateway.http(key) as http:
            n = 0
            while time.monotonic() < end:
                n += 1
                pacers[key].wait()
                if abort_every and n % abort_every == 0:
                    outcome = slow_clients.aborted_stream(gateway.port, gateway.ca, key, MODEL, max_tokens=32)
                    with lock:
                        aborted.append(outcome)
                    continue
                kind, question, start = ("chat", "stream", "text")[n % 3], rng.choice(QUESTIONS), time.perf_counter()
                body = {"model": MODEL, "max_tokens": 16}
                try:
                    if kind == "text":
                        status = http.post("/v1/completions", json=body | {"prompt": question}).status_code
                    elif kind == "chat":
                        status = http.post("/v1/chat/completions", json=body | {"messages": [{"role": "user", "content": question}]}).status_code
                    else:
                        with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True, "messages": [
                                {"role": "user", "content": question}]}) as answer:
                            for _ in answer.iter_lines():
                                pass
                            status = answer.status_code
                except httpx2.TransportError as err:
                    status = f"transport: {type(err).__name__}: {err}"
                with lock:
                    well_formed.append((kind, status, time.perf_counter() - start, key))

    give_up = 60.0

    def slow_client(index: int) -> None:
        kinds = [lambda: slow_clients.silent(gateway.port, gateway.ca, give_up),
                 lambda: slow_clients.trickle(gateway.port, gateway.ca, give_up),
                 lambda: slow_clients.idle_body(gateway.port, gateway.ca, give_up, gateway.slow),
                 lambda: slow_clients.idle_body(gateway.port, gateway.ca, give_up, None)]
        n = index
        while time.monotonic() < end:
            outcome = kinds[n % 4]()
            n += 1
            with lock:
                misbehaved.append(outcome)
            if outcome.error:
                time.sleep(0.5)

    def greedy_client() -> None:
        with gateway.http(gateway.greedy) as http:
            while time.monotonic() < end:
                try:
                    answer = http.get("/admin/limits")
                    status = answer.status_code if answer.status_code != 429 else f"429 {answer.json()['error']['code']}"
                except httpx2.TransportError as err:
                    status = f"transport: {type(err).__name__}"
                greedy.append(status)
                time.sleep(1 / greedy_rps)

    def sample_memory() -> None:
        while time.monotonic() < end + 1:
            rss.append((time.monotonic() - began, gateway.rss_mib()))
            time.sleep(5)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    threads += [threading.Thread(target=slow_client, args=(i,)) for i in range(slow)]
    threads += [threading.Thread(target=greedy_client), threading.Thread(target=sample_memory)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load_s = time.monotonic() - began

    headers_sent = [o for o in misbehaved if o.kind.startswith("idle_body") and not o.error]
    # + 2: the check below that it still serves and the auditor's metrics read, both audited too
    sent = len(well_formed) + len([o for o in aborted if not o.error]) + len(headers_sent) + len(greedy) + 2
    with gateway.http(gateway.clients[0]) as http:
        after = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "user", "content": "What is 2 + 3?"}]}).status_code
    with gateway.http(gateway.auditor) as http:
        metrics = [line for line in http.get("/metrics").text.splitlines()
                   if line.startswith(("ft2prod_gateway_connections_closed_total", "ft2prod_gateway_denied_total"))]
    gateway.settled_records()
    stopped = gateway.stop()  # the graceful stop writes the refusals counted since the last aggregated record
    audit = gateway.audit_counts()
    verified = subprocess.run([sys.executable, "-m", "workflow.serve", "--config", str(gateway.config), "audit", "verify"],
                              capture_output=True, text=True, check=False)
    log = gateway.log.read_text()
    latencies = [seconds for _, status, seconds, _ in well_formed if isinstance(status, int) and status < 300]
    refused = Counter(refusal(o) for o in misbehaved if o.status) + Counter(str(s) for s in greedy if s != 200)
    warm = next((mib for at, mib in rss if at >= min(30.0, 0.1 * seconds)), rss[-1][1])
    return {
        "machine": (f"{platform.machine()}, {os.cpu_count()} cores, load average (1/5/15 min) "
                    f"{'/'.join(f'{x:.2f}' for x in load_before)} at the start, "
                    f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())} at the end"),
        "load_s": round(load_s, 1), "concurrency": concurrency, "slow_clients": slow,
        "well_formed": {"requests": len(well_formed), **Counter(status_class(s) for _, s, _, _ in well_formed),
                        "by_kind": dict(Counter(k for k, _, _, _ in well_formed)),
                        "keys": len(gateway.keys), "analyst_rate_per_minute": analyst_rate,
                        "per_key": sorted(Counter(key for _, _, _, key in well_formed).values()),
                        "not_2xx": dict(Counter(str(s) for _, s, _, _ in well_formed if status_class(s) != "2xx").most_common(5))},
        "latency_s": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95), "p99": percentile(latencies, 0.99),
                      "max": max(latencies, default=float("nan"))},
        "aborted_streams": {"requests": len(aborted), **Counter(status_class(o.status) if o.status else "no answer"
                                                               for o in aborted)},
        "expected_refusals": dict(refused) | {"greedy_2xx": sum(s == 200 for s in greedy)},
        "slow_connections": {kind: {"n": len(group), "closed_by_gateway": sum(o.closed_s is not None for o in group),
                                    "answered": dict(Counter(str(o.status) for o in group)),
                                    "client_errors": sum(bool(o.error) for o in group)}
                             for kind in ("silent", "trickle", "idle_body_key", "idle_body_nokey")
                             for group in [[o for o in misbehaved if o.kind == kind]]},
        "rss_mib": {"load_start": rss[0][1], "warm": warm, "end": rss[-1][1], "peak": max(m for _, m in rss)},
        "audit": {"request_records": audit["own"] - records_before, "aggregated_requests": audit["aggregated"],
                  "requests_sent": sent, "verify": (verified.stdout or verified.stderr).strip(), "verified": verified.returncode == 0},
        "serving_after": after == 200, "stopped": stopped,
        "gateway_log": {"503_concurrency_limit": log.count("Exceeded concurrency limit"),
                        "asgi_exceptions": log.count("Exception in ASGI application")},
        "metrics": metrics,
    }


def report(figures: dict) -> str:
    w, lat, mem, audit = figures["well_formed"], figures["latency_s"], figures["rss_mib"], figures["audit"]
    lines = [
        (f"soak: {figures['load_s']:.0f} s at concurrency {figures['concurrency']} with {figures['slow_clients']} slow clients; "
         f"{figures['machine']}"),
        f"well-formed requests: {w['requests']} — 2xx {w.get('2xx', 0)}, 4xx {w.get('4xx', 0)}, 5xx {w.get('5xx', 0)}, "
        f"transport errors {w.get('transport', 0)}; by kind {w['by_kind']}" + (f"; not 2xx: {w['not_2xx']}" if w["not_2xx"] else ""),
        f"latency (2xx, to the last byte): p50 {lat['p50']:.3f} s, p95 {lat['p95']:.3f} s, p99 {lat['p99']:.3f} s, max {lat['max']:.3f} s",
        f"aborted streams: {figures['aborted_streams']}",
        f"expected refusals: {figures['expected_refusals']}",
        f"slow connections: {figures['slow_connections']}",
        (f"gateway RSS: {mem['load_start']:.0f} MiB at load start, {mem['warm']:.0f} after warm-up, {mem['end']:.0f} at the end "
         f"(peak {mem['peak']:.0f})"),
        (f"audit: {audit['request_records']} records of their own + {audit['aggregated_requests']} requests in aggregated "
         f"records = {audit['request_records'] + audit['aggregated_requests']} for {audit['requests_sent']} requests sent; "
         f"{audit['verify']}"),
        f"serving after: {figures['serving_after']}; gateway log: {figures['gateway_log']}",
        "metrics: " + "; ".join(figures["metrics"]),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--keys", type=int, default=8, help="analyst keys the well-formed clients share, each kept within the default analyst rate")
    parser.add_argument("--slow", type=int, default=250, help="slow clients at once (the issue measured 250)")
    parser.add_argument("--abort-every", type=int, default=10)
    parser.add_argument("--greedy-rps", type=float, default=20)
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of the bootstrap model (embedded default: 4)")
    parser.add_argument("--work", help="folder for the package, keys, audit log and gateway log (default: a new temporary one)")
    parser.add_argument("--package", help="serve this package (its kek.bin and signing.pem beside it) instead of building one")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ft2prod-soak-"))
    package = Path(args.package) if args.package else build_package(work / "package", args.layers)
    figures = soak(package, work / "gateway", args.minutes * 60, args.concurrency, args.keys, args.slow, args.abort_every,
                   args.greedy_rps)
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
