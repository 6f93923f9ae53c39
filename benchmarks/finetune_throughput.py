"""Fine-tune throughput of the workflow's own finetune stage against a stock DeepSpeed ZeRO-2 baseline.

    python benchmarks/finetune_throughput.py --shape llama-1b qwen2-1.5b          # one GPU, both shapes
    python benchmarks/finetune_throughput.py --shape llama-1b --nproc 2 --variants optimized-zero3 --consolidate
    python benchmarks/finetune_throughput.py --device cpu --tiny                  # here, to debug in seconds

Every variant is launched the way rule finetune launches it: workflow.finetune.launch writes the job file and
builds the torchrun command, and workflow.finetune.train runs the Trainer + DeepSpeed ranks. Only the
`finetune:` settings differ between variants (MLflow is not used: the run id is left empty):

  baseline         stock Trainer + DeepSpeed ZeRO-2: the model's own layers, SDPA attention, right-padded
                   micro-batches (no packing), torch's multi-tensor (foreach) AdamW, no dataloader workers
  optimized        the config defaults: Liger kernels, padding-free packing with varlen FlashAttention,
                   fused AdamW, dataloader workers with pinned memory, ZeRO knobs sized from the model; ZeRO-2
  optimized-zero3  the same with ZeRO-3

The baseline also leaves ZeRO's buckets to the Trainer and DeepSpeed's bf16 overflow scan on (zero_tuning:
stock). Every variant logs every --log-every steps; loss parity compares those logged means (each the mean
loss over its steps).

The model is made from config (random weights, one seed, shared by all variants) and the data is synthetic,
made locally: rows of a learnable token process with the first quarter of each row masked out of the loss
(a prompt) as the workflow's assistant-only labels are. All variants see the same rows in the same order
(same seed, same micro-batch): packing concatenates a micro-batch's rows into one row with restarting
position ids, so it changes the layout of a step, not which rows it holds, and the losses are comparable.
With --lengths full (the default) every row is exactly --seq tokens, so the baseline pads nothing and the
speed-up comes from kernels and the optimizer alone; --lengths mixed draws lengths from seq/8..seq, where
packing also saves the padding.

MFU = tokens/s x (6 N + 12 L d s) / (GPUs x peak), the PaLM/Megatron count: N the parameters that do matrix
work (an untied input embedding is a lookup and is left out), L layers, d hidden size, s the sequence length
(for mixed lengths, sum s^2 / sum s over the rows), the attention term counting the whole s x s square;
peak 989 TFLOP/s, dense bf16 on an H100 SXM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from workflow.config import FinetuneConfig  # noqa: E402
from workflow.finetune import ops  # noqa: E402
from workflow.finetune.job import Measurement  # noqa: E402
from workflow.finetune.launch import launch_command, launch_env, write_job  # noqa: E402

SHAPES = {
    # Llama-3.2-1B: 1.24 B parameters, tied embeddings.
    "llama-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5),
    # DeepSeek-R1-Distill-Qwen-1.5B: 1.78 B parameters, untied embeddings, q/k/v biases.
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=False,
                       rope_theta=10000.0, max_position_embeddings=131072, rms_norm_eps=1e-6),
    # Llama-3.1-8B and DeepSeek-R1-Distill-Llama-8B: 8.03 B parameters, untied embeddings.
    "llama-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                     rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5),
    # DeepSeek-R1-Distill-Qwen-7B: 7.62 B parameters, untied embeddings, q/k/v biases.
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
                     rope_theta=10000.0, max_position_embeddings=131072, rms_norm_eps=1e-6),
    # For --tiny runs on a CPU.
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=1024),
}
VARIANTS = {
    "baseline": dict(zero_stage=2, packing=False, attention="sdpa", liger_kernel=False, optimizer="adamw_foreach", dataloader_workers=0,
                     zero_tuning="stock", gradient_checkpointing=False, micro_batch_fill="off"),
    "optimized": dict(zero_stage=2),
    "optimized-zero3": dict(zero_stage=3),
    # One optimization off at a time (to see what each is worth).
    "optimized-no-liger": dict(zero_stage=2, liger_kernel=False),
    "optimized-unpacked": dict(zero_stage=2, packing=False, attention="sdpa"),
    "optimized-zero0": dict(zero_stage=0),
    "optimized-stock-zero": dict(zero_stage=2, zero_tuning="stock"),
    "optimized-zero3-stock-zero": dict(zero_stage=3, zero_tuning="stock"),
    "optimized-compile": dict(zero_stage=2, torch_compile=True),
    "optimized-no-fill": dict(zero_stage=2, micro_batch_fill="off"),
    "optimized-zero3-no-fill": dict(zero_stage=3, micro_batch_fill="off"),
    # Every decoder layer checkpointed by hand, against gradient_checkpointing: auto (the defaults).
    "optimized-full-ckpt": dict(zero_stage=2, gradient_checkpointing=True),
    "optimized-zero3-full-ckpt": dict(zero_stage=3, gradient_checkpointing=True),
}
H100_BF16_DENSE = 989e12


def make_model(shape: str, out: Path, seed: int, device: str) -> dict:
    """A randomly initialised model of the shape, saved as a Hugging Face folder (made once, reused)."""
    spec = dict(SHAPES[shape])
    if not (out / "config.json").exists():
        config = AutoConfig.for_model(**spec)
        torch.manual_seed(seed)
        with torch.device("cuda" if device == "cuda" else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        model.save_pretrained(out)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    config = json.loads((out / "config.json").read_text())
    params = sum_params(spec)
    return {"config": config, "parameters": params["total"], "matmul_parameters": params["matmul"]}


def sum_params(spec: dict) -> dict:
    h, layers, inter, vocab = spec["hidden_size"], spec["num_hidden_layers"], spec["intermediate_size"], spec["vocab_size"]
    head = h // spec["num_attention_heads"]
    kv = spec["num_key_value_heads"] * head
    attn = h * h * 2 + h * kv * 2 + (h + 2 * kv if spec["model_type"] == "qwen2" else 0)
    layer = attn + 3 * h * inter + 2 * h
    embed = vocab * h
    total = embed * (1 if spec["tie_word_embeddings"] else 2) + layers * layer + h
    # The embedding lookup does no matrix work; the lm_head does (tied or not).
    return {"total": total, "matmul": total - (0 if spec["tie_word_embeddings"] else embed)}


def make_data(out: Path, rows: int, seq: int, vocab: int, lengths: str, seed: int) -> list[int]:
    """Synthetic token rows: each next token is a fixed function of the previous one 90 % of the time, so
    the loss falls as the model learns it; the first quarter of each row is a prompt with labels -100."""
    rng = random.Random(seed)
    active = min(vocab, 4096)
    successor = list(range(active))
    rng.shuffle(successor)
    out.mkdir(parents=True, exist_ok=True)
    sizes = []
    with open(out / "train.jsonl", "w") as handle:
        for _ in range(rows):
            n = seq if lengths == "full" else rng.randint(max(8, seq // 8), seq)
            token = rng.randrange(active)
            ids = []
            for _ in range(n):
                ids.append(token)
                token = successor[token] if rng.random() < 0.9 else rng.randrange(active)
            prompt = n // 4
            handle.write(json.dumps({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}) + "\n")
            sizes.append(n)
    (out / "val.jsonl").write_text("")
    return sizes


def flops_per_token(spec: dict, matmul_params: int, sizes: list[int]) -> float:
    attention_s = sum(s * s for s in sizes) / sum(sizes)
    return 6 * matmul_params + 12 * spec["num_hidden_layers"] * spec["hidden_size"] * attention_s


def run_variant(name: str, args, model_dir: Path, data_dir: Path, out: Path) -> dict:
    settings = {
        **dict(launcher="torchrun", nproc_per_node=args.nproc, precision="bf16" if args.device == "cuda" else "fp32",
               max_steps=args.steps, micro_batch_size=args.micro_batch, gradient_accumulation_steps=args.grad_accum,
               learning_rate=args.lr, lr_scheduler="constant_with_warmup", warmup_ratio=0.1, logging_steps=args.log_every,
               save_steps=10**6, save_total_limit=1),
        **VARIANTS[name],
    }
    profiled = args.profile is not None and (not args.profile or name in args.profile)
    if profiled:
        # Three more steps, profiled after the timed ones (the profiler's overhead stays out of the timing), with
        # the same number of warm-up steps as the other variants (the Trainer rounds ratio x steps up), so that the
        # learning rates, and the losses, of the timed steps stay comparable.
        settings["max_steps"] = args.steps + 3
        settings["warmup_ratio"] = (math.ceil(settings["warmup_ratio"] * args.steps) - 0.5) / (args.steps + 3)
    cfg = FinetuneConfig(**settings)
    work = args.work / f"{args.shape_name}-{name}-{args.nproc}gpu"
    shutil.rmtree(work, ignore_errors=True)
    profile = {"profile_dir": str(args.out / f"profile-{args.shape_name}-{args.seq}-{name}"), "profile_start": args.steps,
               "timing_end_step": args.steps} if profiled else {}
    measure = Measurement(save_checkpoints=args.consolidate, timing_skip_steps=args.warmup, **profile)
    job = write_job(model_dir, data_dir, work / "summary.json", cfg, args.seed, measure)
    command = launch_command(cfg, job)
    env = launch_env(cfg, run_id="", tracking_uri="")
    ops.build(cfg, Path(env["TORCH_EXTENSIONS_DIR"]))  # as the rule does: one build under a lock, not one per rank
    log_path = out / f"{args.shape_name}-{name}-{args.nproc}gpu.log"
    print(f"\n== {args.shape_name} {name} on {args.nproc} {args.device} rank(s): {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as sink:
        done = subprocess.run(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = log_path.read_text().splitlines()[-25:]
        print("\n".join(tail))
        return {"variant": name, "failed": f"exit status {done.returncode}; see {log_path}", "wall_seconds": wall}
    summary = json.loads((work / "summary.json").read_text())
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    result = {"variant": name, "settings": settings, "speed": summary["speed"], **summary["throughput"],
              "losses": losses, "wall_seconds": wall, "checkpoint": summary["checkpoint"], "cfg": cfg, "memory": summary["memory"]}
    memory = summary["memory"]
    print(f"   micro-batch {memory['micro_batch_size']} x accumulation {memory['gradient_accumulation_steps']}; "
          f"{result['tokens_per_second']:.0f} tokens/s over {result['timed_steps']} steps, peak "
          f"{result['peak_memory_gib'] or 0:.1f} GiB (planner: {memory['predicted_peak_gib']} GiB; {memory['checkpointed_layers']} of "
          f"{memory['num_layers']} layers checkpointed), losses {losses[0]:.3f} -> {losses[-1]:.3f}, wall {wall:.0f} s", flush=True)
    return result


def consolidate(model_dir: Path, result: dict, out_dir: Path) -> dict:
    """The export stage's consolidation (workflow.finetune.export.load_trained) of the variant's last checkpoint."""
    from workflow.finetune.export import load_trained

    checkpoint = Path(result["checkpoint"])
    started = time.perf_counter()
    model = load_trained(model_dir, checkpoint, result["cfg"])
    seconds = time.perf_counter() - started
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    changed = max((p.float() - q).abs().max().item() for p, q in zip(model.parameters(), base.parameters()))
    model.to(torch.bfloat16).save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16)
    info = {"checkpoint": str(checkpoint), "parameters": sum(p.numel() for p in model.parameters()),
            "max_abs_weight_change": changed, "seconds": seconds,
            "reloaded_parameters": sum(p.numel() for p in reloaded.parameters())}
    print(f"   consolidated {checkpoint.name} (ZeRO-{result['cfg'].zero_stage}) in {seconds:.0f} s: "
          f"{info['parameters']:,} parameters, max |w - w_base| = {changed:.4g}; saved and reloaded from {out_dir}", flush=True)
    return info


def parity(base: list[float], other: list[float]) -> float:
    return max(abs(a - b) / abs(a) for a, b in zip(base, other))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=["llama-1b"], choices=[s for s in SHAPES if s != "tiny"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short rows (CPU debugging)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=["baseline", "optimized", "optimized-zero3"], choices=list(VARIANTS))
    parser.add_argument("--nproc", type=int, default=1, help="ranks (GPUs) per variant")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per rank per micro-step")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    parser.add_argument("--qwen-micro-batch", type=int, default=4,
                        help="micro-batch for qwen2-1.5b (its baseline's logits do not fit at 8); gradient accumulation keeps the global batch")
    parser.add_argument("--lengths", choices=["full", "mixed"], default="full")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--log-every", type=int, default=5,
                        help="logging steps: the loss is read back (a host sync) and averaged over this many steps")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE / 1e12, help="per GPU, for MFU")
    parser.add_argument("--consolidate", action="store_true", help="save the final checkpoint and consolidate it as export does")
    parser.add_argument("--profile", nargs="*", default=None, metavar="VARIANT",
                        help="torch.profiler over 3 extra steps after the timed ones (the named variants, or all): profile-*/profile.txt")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ft2prod-finetune-bench"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/ft2prod-finetune-bench/out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.shape, args.seq = ["tiny"], min(args.seq, 64)
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{args.nproc} rank(s); seq {args.seq}, steps {args.steps} (first {args.warmup} untimed), lengths {args.lengths}")
    print("MFU =" + __doc__.split("MFU =")[1].strip())
    report = []
    base_batch = args.micro_batch * args.grad_accum
    for shape in args.shape:
        args.shape_name = shape
        micro = args.qwen_micro_batch if shape == "qwen2-1.5b" else args.micro_batch
        args_grad = base_batch // micro
        shape_args = argparse.Namespace(**{**vars(args), "micro_batch": micro, "grad_accum": args_grad})
        model_dir = args.work / f"model-{shape}"
        model = make_model(shape, model_dir, args.seed, args.device)
        rows = (args.steps + 3) * base_batch * args.nproc
        sizes = make_data(args.work / f"data-{shape}-{args.seq}-{args.lengths}", rows, args.seq, SHAPES[shape]["vocab_size"], args.lengths, args.seed)
        per_token = flops_per_token(SHAPES[shape], model["matmul_parameters"], sizes)
        print(f"\n# {shape}: {model['parameters'] / 1e9:.3f} B parameters ({model['matmul_parameters'] / 1e9:.3f} B in matmuls), "
              f"{per_token / 1e9:.2f} GFLOP per token; micro-batch {micro} x accumulation {args_grad} x {args.nproc} rank(s), "
              f"{sum(sizes) / len(sizes):.0f} tokens per row on average")
        results = {}
        for name in args.variants:
            result = run_variant(name, shape_args, model_dir, args.work / f"data-{shape}-{args.seq}-{args.lengths}", args.out)
            if "tokens_per_second" in result:
                result["mfu"] = result["tokens_per_second"] * per_token / (args.nproc * args.peak_tflops * 1e12)
            results[name] = result
            if args.consolidate and "checkpoint" in result and result["checkpoint"]:
                result["consolidated"] = consolidate(model_dir, result, args.work / f"export-{shape}-{name}")
        report.append((shape, model, results))
    print_report(report, args)


def print_report(report, args) -> None:
    lines = [(f"\n{'shape':<11} {'variant':<16} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>8} {'planned':>7} {'error':>6} {'ckpt':>5} "
              f"{'vs baseline':>11} {'loss parity':>12}")]
    summary = []
    for shape, model, results in report:
        base = results.get("baseline", {})
        for name, r in results.items():
            if "failed" in r:
                lines.append(f"{shape:<11} {name:<16} failed: {r['failed']}")
                continue
            ratio = r["tokens_per_second"] / base["tokens_per_second"] if "tokens_per_second" in base else math.nan
            diff = parity(base["losses"], r["losses"]) if "losses" in base and name != "baseline" else math.nan
            planned, measured = r["memory"]["predicted_peak_gib"], r["peak_memory_gib"]
            error = (planned - measured) / measured if planned and measured else math.nan
            layers = f"{r['memory']['checkpointed_layers']}/{r['memory']['num_layers']}"
            lines.append(f"{shape:<11} {name:<16} {r['tokens_per_second']:9.0f} {r['mfu']:6.1%} {measured or 0:8.1f} {planned or 0:7.1f} "
                         f"{error:+6.1%} {layers:>5} {ratio:10.2f}x {diff:12.2e}")
            summary.append({k: v for k, v in r.items() if k != "cfg"} | {"shape": shape, "ratio_vs_baseline": ratio,
                                                                          "max_rel_loss_diff_vs_baseline": diff})
        if "optimized" in results and "optimized-zero3" in results and "tokens_per_second" in results["optimized-zero3"]:
            z2, z3 = results["optimized"]["tokens_per_second"], results["optimized-zero3"]["tokens_per_second"]
            lines.append(f"{shape:<11} ZeRO-3 / ZeRO-2 (optimized): {z3 / z2:.2f}")
        for name, r in results.items():
            if "losses" in r:
                lines.append(f"{shape:<11} {name:<16} loss by step: " + " ".join(f"{x:.3f}" for x in r["losses"]))
    text = "\n".join(lines)
    print(text)
    (args.out / "finetune_throughput.json").write_text(json.dumps(summary, indent=1, default=str))
    (args.out / "finetune_throughput.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
