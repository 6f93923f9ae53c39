"""Output tokens/s of ONNX Runtime GenAI engines (fp32, int8, int4) against plain transformers `generate()`.

    .venv/bin/python benchmarks/engine_throughput.py [--layers 13] [--requests 8] [--input-len 512] [--output-len 128]

Builds a ~150M-parameter Llama (hidden 1024, 16 heads, 4 KV heads, MLP 2816, 13 layers; seeded random
weights, the bootstrap tokenizer), builds the engines with the workflow's own builder code, and drives every
candidate with the workflow's own continuous-load generator at concurrency 1 and 8, in one run on one
machine. The baseline serves each request with its own `model.generate()` call (what plain transformers
serving does); a lock-step batched `generate()` is printed too. Greedy-token agreement with the fp32
model on the same prompts stands in for accuracy on this untrained model: the pipeline measures accuracy
loss on its fine-tuned model (results/select/report.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from workflow.benchmark import LoadConfig, measure
from workflow.bootstrap.model import BootstrapConfig, make_base_model
from workflow.engine import onnxruntime


class TokenQueue(BaseStreamer):
    def __init__(self) -> None:
        self.tokens: queue.Queue = queue.Queue()
        self.skip = True

    def put(self, value) -> None:
        if self.skip:  # generate() first hands over the prompt
            self.skip = False
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(token)

    def end(self) -> None:
        self.tokens.put(None)


class TransformersEngine:
    """Plain transformers serving: one greedy generate() call per request, streamed."""

    def __init__(self, model) -> None:
        self.model = model

    def stream(self, prompt_ids, max_new_tokens, min_new_tokens=0):
        streamer = TokenQueue()
        arguments = {"input_ids": torch.tensor([prompt_ids]), "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens,
                     "do_sample": False, "streamer": streamer}
        worker = threading.Thread(target=lambda: torch.inference_mode()(self.model.generate)(**arguments))
        worker.start()
        while (token := streamer.tokens.get()) is not None:
            yield token
        worker.join()


def make_model(out: Path, layers: int) -> Path:
    tokenizer_dir = out / "tokenizer"
    make_base_model(BootstrapConfig(num_layers=1, pretrain_steps=1, pretrain_rows=200), tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def agreement(engine, reference: list[list[int]], prompts: list[list[int]], n: int) -> float:
    """Share of greedy tokens equal to the fp32 model's, position by position."""
    same = total = 0
    for prompt, expected in zip(prompts, reference):
        got = list(engine.stream(prompt, n, min_new_tokens=n))
        same += sum(a == b for a, b in zip(got, expected))
        total += n
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ft2prod-bench-"))
    model_dir = make_model(work, args.layers)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    parameters = sum(p.numel() for p in model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    specials = set(tokenizer.all_special_ids)
    load = LoadConfig(input_len=args.input_len, output_len=args.output_len, concurrency=(1, 8), requests=args.requests)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; model {parameters / 1e6:.0f}M parameters; "
          f"input {args.input_len}, output {args.output_len}, {args.requests} requests per level")

    candidates = {"transformers generate (fp32)": TransformersEngine(model)}
    for scheme, label in (("bf16", "fp32"), ("int8_sq", "int8"), ("int4_awq", "int4")):
        engine_dir = work / "engines" / scheme
        started = time.perf_counter()
        onnxruntime.build(model_dir, engine_dir, scheme, "cpu", 32, 4, "benchmark", work / "build.log")
        print(f"built ONNX Runtime GenAI {label} engine in {time.perf_counter() - started:.1f} s")
        candidates[f"onnxruntime-genai {label}"] = onnxruntime.OrtEngine(engine_dir)

    probe = [[t for t in range(5, 5 + 64)], [t for t in range(100, 164)], [t for t in range(200, 264)]]
    reference = [list(candidates["transformers generate (fp32)"].stream(p, 32, min_new_tokens=32)) for p in probe]
    results = {}
    for name, engine in candidates.items():
        levels, _ = measure(engine, len(tokenizer), specials, load)
        results[name] = {"levels": levels, "greedy_agreement_with_fp32": agreement(engine, reference, probe, 32)}

    batched = torch.randint(10, len(tokenizer) - 10, (8, args.input_len))
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(batched, max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
    lockstep = 8 * args.output_len / (time.perf_counter() - started)

    baseline = {lv["concurrency"]: lv["output_tokens_per_s"] for lv in results["transformers generate (fp32)"]["levels"]}
    print(f"\n{'candidate':34} {'conc':>4} {'out tok/s':>10} {'x baseline':>10} {'p95 lat s':>10} {'ttft p50 s':>10} {'agree fp32':>10}")
    for name, result in results.items():
        for level in result["levels"]:
            c = level["concurrency"]
            print(f"{name:34} {c:>4} {level['output_tokens_per_s']:>10.1f} {level['output_tokens_per_s'] / baseline[c]:>10.2f} "
                  f"{level['latency_p95_s']:>10.2f} {level['ttft_p50_s']:>10.3f} {result['greedy_agreement_with_fp32']:>10.3f}")
    print(f"{'transformers generate, batch 8 lock-step':42} {lockstep:>10.1f} output tok/s")
    if args.json:
        args.json.write_text(json.dumps({"parameters": parameters, "results": results, "lockstep_batch8_tokens_per_s": lockstep}, indent=1))


if __name__ == "__main__":
    main()
