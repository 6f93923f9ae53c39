"""Evaluation-length generation through workflow.generation: the GPU path against the CPU path on the same machine.

    python benchmarks/eval_throughput.py [--shape llama-8b] [--prompts 256] [--prompt-len 512] [--new-tokens 1024]

A model of the shape with random weights (no hub), random prompts of one length, EOS ignored (every prompt runs its
whole budget). GPU: the model in bf16 with the attention generation uses on GPUs (generation.PACKED), the batch the
planner's memory model fits (capacity.generation_memory), a static KV cache; the decoding step is compiled by a short
warm-up of the same shapes, timed apart. The same batch with Transformers' SDPA (the cache repeated for every query
head when compiled) runs --sdpa-tokens tokens for comparison. CPU: the CPU
path (fp32, evaluate.batch_size rows at a time) on --cpu-prompts prompts for --cpu-tokens tokens, extrapolated to
the whole job at its measured tokens/s. Prints one table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workflow import generation
from workflow.capacity import Architecture, generation_memory
from workflow.config import Cluster

SHAPES = {  # the published configs' shapes (random weights)
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                     tie_word_embeddings=True),
}


def build(shape: str) -> LlamaForCausalLM:
    generation.register_packed_attention()
    config = LlamaConfig(**SHAPES[shape], attn_implementation=generation.PACKED)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # EOS ignored: every prompt generates its whole budget
    return model


def gpu_run(model, prompts, new_tokens: int, cluster: Cluster) -> dict:
    arch = Architecture.from_hf_config(model.config.to_dict())
    cache_len = generation.cache_length(prompts, new_tokens)
    batch = generation.fitted_batch(arch, cluster, cache_len, len(prompts[0]), 2, len(prompts))
    memory = generation_memory(arch, batch, cache_len, len(prompts[0]), 2, cluster)
    planned = round(memory["device_gib"] - memory["per_device_gib"]["overhead"], 3)  # what max_memory_allocated sees
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    generation.generate(model, prompts[:batch], 4, batch, pad_id=0, eos=set(), static_cache=True)  # compiles the step
    torch.cuda.synchronize()
    warm_up = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        journal = generation.Journal(os.path.join(tmp, "j.jsonl"), "bench")
        start2 = time.perf_counter()
        out = generation.generate(model, prompts, new_tokens, batch, pad_id=0, eos=set(), journal=journal, static_cache=True)
        torch.cuda.synchronize()
        run = time.perf_counter() - start2
    tokens = sum(len(t) for t, _ in out)
    return {"device": torch.cuda.get_device_name(), "batch": batch, "tokens": tokens, "warm_up_s": round(warm_up, 1),
            "generate_s": round(run, 1), "end_to_end_s": round(warm_up + run, 1), "tok_s": round(tokens / run, 1),
            "tok_s_end_to_end": round(tokens / (warm_up + run), 1), "planned_gib": planned,
            "peak_gib": generation.peak_gib(torch.device("cuda"))}


def sdpa_run(model, prompts, batch: int, new_tokens: int) -> dict:
    """One batch with Transformers' own SDPA (compiled: the cache repeated per query head), short, for comparison."""
    model.set_attn_implementation("sdpa")
    try:
        generation.generate(model, prompts[:batch], 4, batch, pad_id=0, eos=set(), static_cache=True)  # compiles
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = generation.generate(model, prompts[:batch], new_tokens, batch, pad_id=0, eos=set(), static_cache=True)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    finally:
        model.set_attn_implementation(generation.PACKED)
    tokens = sum(len(t) for t, _ in out)
    return {"batch": batch, "tokens": tokens, "generate_s": round(elapsed, 1), "tok_s": round(tokens / elapsed, 1)}


def cpu_run(model, prompts, new_tokens: int, total_tokens: int) -> dict:
    model = model.to("cpu", torch.float32)
    start = time.perf_counter()
    out = generation.generate(model, prompts, new_tokens, len(prompts), pad_id=0, eos=set())
    elapsed = time.perf_counter() - start
    tokens = sum(len(t) for t, _ in out)
    return {"device": f"CPU, {torch.get_num_threads()} threads", "batch": len(prompts), "tokens": tokens,
            "generate_s": round(elapsed, 1), "tok_s": round(tokens / elapsed, 2),
            "extrapolated_s": round(total_tokens / (tokens / elapsed), 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b", choices=SHAPES)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--sdpa-tokens", type=int, default=64, help="new tokens of the SDPA comparison (0: none)")
    parser.add_argument("--cpu-prompts", type=int, default=2)
    parser.add_argument("--cpu-tokens", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    cluster = Cluster(gpus_per_node=1, gpu_memory_gib=round(gib, 1), overhead_gib=2)
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(1000, 100000, (args.prompts, args.prompt_len), generator=generator).tolist()
    model = build(args.shape)
    gpu = gpu_run(model, prompts, args.new_tokens, cluster)
    print(json.dumps({"gpu": gpu}), flush=True)
    sdpa = sdpa_run(model, prompts, gpu["batch"], args.sdpa_tokens) if args.sdpa_tokens else None
    print(json.dumps({"sdpa": sdpa}), flush=True)
    if args.json:  # written now too: the CPU part is slow to start (the model moved to fp32) and may be cut short
        with open(args.json, "w") as handle:
            json.dump({"shape": args.shape, "gpu": gpu, "sdpa": sdpa}, handle, indent=1)
    cpu = cpu_run(model, prompts[: args.cpu_prompts], args.cpu_tokens, args.prompts * args.new_tokens) if args.cpu_prompts else None
    result = {"shape": args.shape, "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "gpu": gpu, "sdpa": sdpa, "cpu": cpu}
    print(f"\n{args.shape}, {args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens each (EOS ignored)")
    print("| path | device | batch | output tokens | time | output tok/s | memory planned / peak |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| GPU (bf16, static cache, compiled, packed GQA decoding) | {gpu['device']} | {gpu['batch']} | {gpu['tokens']:,} | "
          f"{gpu['generate_s']} s + {gpu['warm_up_s']} s compile = {gpu['end_to_end_s']} s | {gpu['tok_s']:,} "
          f"({gpu['tok_s_end_to_end']:,} end to end) | {gpu['planned_gib']} / {gpu['peak_gib']} GiB |")
    if sdpa:
        print(f"| GPU, Transformers' SDPA (cache repeated per head) | {gpu['device']} | {sdpa['batch']} | {sdpa['tokens']:,} | "
              f"{sdpa['generate_s']} s | {sdpa['tok_s']:,} | - |")
    if cpu:
        print(f"| CPU path (fp32) | {cpu['device']} | {cpu['batch']} | {cpu['tokens']} | {cpu['generate_s']} s "
              f"(whole job extrapolated: {cpu['extrapolated_s'] / 3600:.1f} h) | {cpu['tok_s']} | - |")
        print(f"GPU / CPU: {gpu['tok_s'] / cpu['tok_s']:.0f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
