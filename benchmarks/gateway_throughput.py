"""Output tokens/s through the gateway (TLS 1.3, API key, audit log, SSE streaming) against the same engine
called in-process, at rising concurrency: what the gateway costs, and whether throughput grows with load.

    .venv/bin/python benchmarks/gateway_throughput.py [--layers 13] [--requests 16] [--input-len 512] [--output-len 128]

Builds the ~150M-parameter Llama of engine_throughput.py, its int4 ONNX Runtime GenAI engine, packs it
(local key file, fresh signing key), and serves the package with `python -m workflow.serve start`. The
baseline drives the engine in this process with the workflow's continuous-load generator (workflow.benchmark);
the gateway run sends the same prompts (as text) with the official openai client, streaming, one thread per
concurrent request. Both in one run on one machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import torch
import yaml
from engine_throughput import make_model
from transformers import AutoTokenizer

from workflow.benchmark import LoadConfig, measure, synthetic_prompts
from workflow.engine import onnxruntime
from workflow.package import archive
from workflow.package.kms import LocalKeyFile
from workflow.serve.access import KeyStore
from workflow.serve.tls import client_context

CONCURRENCY = (1, 4, 8)


def start_gateway(work: Path, package: Path, port: int) -> tuple[subprocess.Popen, str, Path, str]:
    config = {"package": {"model_name": "bench", "signing_key": str(work / "signing.pem"), "kms": {"local": {"key_file": str(work / "kek.bin")}}},
              "rollout": {"gateway": {"port": port, "api_keys": str(work / "keys.json"), "tls": {"dir": str(work / "tls")},
                                      "audit": {"path": str(work / "audit.jsonl"), "key_file": str(work / "audit.key")},
                                      "limits": {"max_body_bytes": 1 << 20, "max_prompt_tokens": 4096, "max_tokens": 4096}}}}
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    key = KeyStore(work / "keys.json").add("bench", "analyst")
    process = subprocess.Popen([sys.executable, "-m", "workflow.serve", "--config", str(work / "gateway.yaml"), "start",
                                "--package", str(package)], stdout=open(work / "gateway.log", "w"), stderr=subprocess.STDOUT)
    url, ca = f"https://127.0.0.1:{port}", work / "tls" / "ca.pem"
    for _ in range(600):
        try:
            if httpx2.get(f"{url}/readyz", verify=client_context(ca)).status_code == 200:
                return process, url, ca, key
        except (httpx2.TransportError, FileNotFoundError):
            pass
        time.sleep(0.2)
    raise RuntimeError((work / "gateway.log").read_text())


def through_gateway(url: str, ca: Path, key: str, prompts: list[str], output_len: int, concurrency: int) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, http_client=httpx2.Client(verify=client_context(ca), timeout=600))

    def one(prompt: str) -> tuple[float, float, int]:
        start, first, tokens = time.perf_counter(), None, 0
        stream = client.completions.create(model="bench", prompt=prompt, max_tokens=output_len, stream=True,
                                           stream_options={"include_usage": True})
        for chunk in stream:
            first = first or time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return time.perf_counter() - start, first, tokens

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, prompts))
    wall = time.perf_counter() - began
    latencies = sorted(d[0] for d in done)
    return {"concurrency": concurrency, "output_tokens_per_s": sum(d[2] for d in done) / wall,
            "latency_p95_s": latencies[round(0.95 * (len(latencies) - 1))], "ttft_p50_s": statistics.median(d[1] for d in done),
            "output_tokens": sum(d[2] for d in done)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--port", type=int, default=18943)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ft2prod-gateway-bench-"))
    model_dir = make_model(work, args.layers)
    engine_dir = work / "engine"
    onnxruntime.build(model_dir, engine_dir, "int4_awq", "cpu", 32, 4, "benchmark", work / "build.log")
    archive.pack(engine_dir, work / "model.ftpkg", LocalKeyFile(work / "kek.bin", create=True),
                 archive.load_signing_key(work / "signing.pem"), {}, 4 << 20)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load = LoadConfig(input_len=args.input_len, output_len=args.output_len, concurrency=CONCURRENCY, requests=args.requests)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; int4 engine of a "
          f"{args.layers}-layer Llama; input {args.input_len}, output {args.output_len}, {args.requests} requests per level")
    direct, _ = measure(onnxruntime.OrtEngine(engine_dir), len(tokenizer), set(tokenizer.all_special_ids), load)
    texts = [tokenizer.decode(p) for p in synthetic_prompts(len(tokenizer), set(tokenizer.all_special_ids), load)]
    process, url, ca, key = start_gateway(work, work / "model.ftpkg", args.port)
    try:
        served = [through_gateway(url, ca, key, texts, args.output_len, c) for c in CONCURRENCY]
    finally:
        process.terminate()
        process.wait(timeout=60)
    print(f"\n{'path':28} {'conc':>4} {'out tok/s':>10} {'x in-process':>12} {'p95 lat s':>10} {'ttft p50 s':>10}")
    for inproc, gateway in zip(direct, served, strict=True):
        c = inproc["concurrency"]
        print(f"{'engine in-process':28} {c:>4} {inproc['output_tokens_per_s']:>10.1f} {1:>12.2f} {inproc['latency_p95_s']:>10.2f} {inproc['ttft_p50_s']:>10.3f}")
        print(f"{'gateway (TLS, SSE, audit)':28} {c:>4} {gateway['output_tokens_per_s']:>10.1f} "
              f"{gateway['output_tokens_per_s'] / inproc['output_tokens_per_s']:>12.2f} {gateway['latency_p95_s']:>10.2f} {gateway['ttft_p50_s']:>10.3f}")
    print(f"gateway output tokens/s at concurrency {CONCURRENCY[-1]} vs 1: {served[-1]['output_tokens_per_s'] / served[0]['output_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
