"""Output tokens/s of ONNX Runtime GenAI engines (fp32, int8, int4) against plain transformers `generate()`, and
how close each quantized engine stays to the fp32 model with the quantize stage's calibration and without it.

    .venv/bin/python benchmarks/engine_throughput.py [--layers 13] [--requests 8] [--input-len 512] [--output-len 128]

Builds a ~150M-parameter Llama (hidden 1024, 16 heads, 4 KV heads, MLP 2816, 13 layers; seeded random weights,
the bootstrap tokenizer), quantizes it with the workflow's quantize stage (ModelOpt int8_sq and int4_awq,
calibrated on seeded random token rows), and builds every engine with the workflow's own code: fp32, and for
int8 and int4 both a round-to-nearest build and a build with the calibration folded in
(workflow/engine/calibration.py). Accuracy on this untrained model is agreement with the fp32 model: teacher-forced
next-token agreement and mean KL divergence over held-out rows (every position), and greedy-token agreement on
three prompts. The better build of each scheme (higher next-token agreement) is then driven, like the baseline,
by the workflow's own load generator at concurrency 1 and 8 in one run on one machine: the engines batch
concurrent requests continuously (workflow/engine/batching.py); the baseline serves each request with its own
`model.generate()` call (what plain transformers serving does), and a lock-step batched `generate()` is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from workflow import closeness
from workflow.benchmark import LoadConfig, measure
from workflow.bootstrap.model import BootstrapConfig, make_base_model
from workflow.config import QuantizeConfig
from workflow.engine import onnxruntime
from workflow.engine.calibration import fold_calibration
from workflow.engine.interface import GenerationRequest
from workflow.quantize import quantize
from workflow.tracking import Tracking


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

    max_batch_size = 1

    def __init__(self, model) -> None:
        self.model = model

    def stream(self, request: GenerationRequest):
        streamer = TokenQueue()
        arguments = {"input_ids": torch.tensor([list(request.prompt_ids)]), "max_new_tokens": request.max_new_tokens,
                     "min_new_tokens": request.min_new_tokens,
                     "do_sample": False, "streamer": streamer}
        worker = threading.Thread(target=lambda: torch.inference_mode()(self.model.generate)(**arguments))
        worker.start()
        while (token := streamer.tokens.get()) is not None:
            yield token
        worker.join()


def make_model(out: Path, layers: int) -> Path:
    if (out / "model" / "config.json").exists():  # --work of an earlier run: the same seeded model
        return out / "model"
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
        got = list(engine.stream(GenerationRequest(prompt, n, min_new_tokens=n)))
        same += sum(a == b for a, b in zip(got, expected))
        total += n
    return same / total


def closeness_to(engine_dir: Path, model, rows: list[list[int]]) -> dict:
    """Teacher-forced next-token agreement with the fp32 model, and mean KL(fp32 || engine), over every position of
    rows (workflow/closeness.py, what the DAG's engine check measures over reference answers)."""
    every = [{"input_ids": ids, "labels": ids} for ids in rows]
    return closeness.compare(closeness.model_logits(model), closeness.onnx_logits(engine_dir), every)


def quantize_schemes(model_dir: Path, work: Path, vocab: int, rows: int) -> dict[str, Path]:
    """The quantize stage itself (ModelOpt, tracked in a local MLflow file) on seeded random calibration rows."""
    rng = random.Random(1)
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps({"input_ids": [rng.randrange(10, vocab - 10) for _ in range(256)], "labels": []}) + "\n"
                             for _ in range(rows)))
    tracking = Tracking(uri=f"sqlite:///{work}/mlflow.db", experiment="engine-throughput", results_dir=str(work))
    out = {}
    for scheme in ("int8_sq", "int4_awq"):
        out[scheme] = work / "quantize" / scheme
        if (out[scheme] / "quantize.json").exists():
            continue
        started = time.perf_counter()
        quantize(model_dir, train, work / "quantize" / scheme, scheme, QuantizeConfig(calib_samples=rows), tracking)
        print(f"quantized {scheme} with ModelOpt ({rows} calibration rows) in {time.perf_counter() - started:.1f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--calib-rows", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--work", type=Path, help="an earlier run's work folder: reuse its model, quantization and engines")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ft2prod-bench-"))
    print(f"work folder: {work} (pass it as --work to measure again without quantizing and building again)")
    model_dir = make_model(work, args.layers)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    parameters = sum(p.numel() for p in model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    specials = set(tokenizer.all_special_ids)
    load = LoadConfig(input_len=args.input_len, output_len=args.output_len, concurrency=(1, 8), requests=args.requests, repeats=1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
          f"load before: {os.getloadavg()}; model {parameters / 1e6:.0f}M parameters; "
          f"input {args.input_len}, output {args.output_len}, {args.requests} requests per level")

    quantized = quantize_schemes(model_dir, work, len(tokenizer), args.calib_rows)
    rng = random.Random(2)
    held_out = [[rng.randrange(10, len(tokenizer) - 10) for _ in range(256)] for _ in range(8)]
    probe = [[t for t in range(5, 5 + 64)], [t for t in range(100, 164)], [t for t in range(200, 264)]]
    reference = [list(TransformersEngine(model).stream(GenerationRequest(p, 32, min_new_tokens=32))) for p in probe]

    def build(scheme: str, name: str, calibrated: bool) -> Path:
        engine_dir = work / "engines" / name
        if (engine_dir / "engine_manifest.json").exists():
            return engine_dir
        started = time.perf_counter()
        report = None
        if calibrated:
            report = fold_calibration(model_dir, quantized[scheme], scheme, work / "folded" / scheme, held_out[:2])
        manifest = onnxruntime.build(work / "folded" / scheme if calibrated else model_dir, engine_dir, scheme, "cpu", 32, 4,
                                     "benchmark", work / "build.log", calibration=report)
        print(f"built {name} ({manifest.algorithm}) in {time.perf_counter() - started:.1f} s")
        return engine_dir

    accuracy, kept = {}, {"fp32": build("bf16", "fp32", False)}
    for scheme, label in (("int8_sq", "int8"), ("int4_awq", "int4")):
        builds = {"rtn": build(scheme, f"{label} rtn", False), "calibrated": build(scheme, f"{label} calibrated", True)}
        for how, engine_dir in builds.items():
            accuracy[f"{label} {how}"] = closeness_to(engine_dir, model, held_out) | {
                "greedy_agreement": agreement(onnxruntime.OrtEngine(engine_dir), reference, probe, 32)}
        best = max(builds, key=lambda how: (accuracy[f"{label} {how}"]["next_token_agreement"], how == "calibrated"))
        kept[f"{label} ({best})"] = builds[best]

    candidates = {"transformers generate (fp32)": TransformersEngine(model)}
    candidates |= {f"onnxruntime-genai {name}": onnxruntime.OrtEngine(engine_dir, max_batch_size=8) for name, engine_dir in kept.items()}
    results = {}
    for name, engine in candidates.items():
        levels, _ = measure(engine, len(tokenizer), specials, load)
        results[name] = {"levels": levels}

    batched = torch.randint(10, len(tokenizer) - 10, (8, args.input_len))
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(batched, max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
    lockstep = 8 * args.output_len / (time.perf_counter() - started)

    baseline = {lv["concurrency"]: lv["output_tokens_per_s"] for lv in results["transformers generate (fp32)"]["levels"]}
    print(f"\n{'candidate':38} {'conc':>4} {'out tok/s':>10} {'x baseline':>10} {'p95 lat s':>10} {'ttft p50 s':>10}")
    for name, result in results.items():
        for level in result["levels"]:
            c = level["concurrency"]
            print(f"{name:38} {c:>4} {level['output_tokens_per_s']:>10.1f} {level['output_tokens_per_s'] / baseline[c]:>10.2f} "
                  f"{level['latency_p95_s']:>10.2f} {level['ttft_p50_s']:>10.3f}")
    print(f"{'transformers generate, batch 8 lock-step':48} {lockstep:>10.1f} output tok/s")
    print(f"\n{'build':20} {'next-token agree':>16} {'mean KL':>10} {'greedy agree':>12}   (vs the fp32 model)")
    for name, numbers in accuracy.items():
        print(f"{name:20} {numbers['next_token_agreement']:>16.4f} {numbers['mean_kl']:>10.5f} {numbers['greedy_agreement']:>12.3f}")
    print(f"load after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"parameters": parameters, "results": results, "accuracy": accuracy,
                                         "lockstep_batch8_tokens_per_s": lockstep}, indent=1))


if __name__ == "__main__":
    main()
