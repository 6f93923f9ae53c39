"""finetune: launch one training process per device with torchrun or the deepspeed launcher, resumably.

    snakemake results/finetune/summary.json

Inside a SLURM allocation of several nodes (cluster.nodes > 1; the rule then carries the `mpi` resource so the
SLURM executor runs this once, on the first node), srun starts one launcher per node, meeting at the first node
(`scontrol show hostnames $SLURM_JOB_NODELIST`); on one node the command is the same as without SLURM.

Resumable state lives in results/finetune/checkpoints (not a Snakemake output, so a killed job keeps it);
a rerun resumes from the newest checkpoint when its settings and data match (settings that only change how the run
goes or reports, and a longer run, resume too); otherwise the old checkpoints are moved aside, named, with a WARNING
listing the changed keys, and training starts afresh. Checkpoints are never deleted here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from workflow.config import FinetuneConfig
from workflow.finetune.job import Job, Measurement
from workflow.digest import sha256_file
from workflow.finetune import ops
from workflow.finetune.config import latest_complete_checkpoint

if TYPE_CHECKING:
    from workflow.tracking import Tracking

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


NODE_RANK = object()
"""Stands for this node's rank in a multi-node command: srun's per-task $SLURM_NODEID, expanded on each node."""


def slurm_hosts(env: Mapping[str, str]) -> list[str]:
    """The nodes of a multi-node SLURM allocation, first one first (it runs this script: the master); [] when
    not under SLURM or on one node."""
    if int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1) <= 1:
        return []
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("finetune: SLURM_JOB_NUM_NODES > 1 but SLURM_JOB_NODELIST is not set; run inside an sbatch/salloc allocation")
    done = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=False, env=dict(env), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"finetune: `scontrol show hostnames {nodelist}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.split()


def launch_command(cfg: FinetuneConfig, job_file: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """The launcher command line: one process per device on this node, or, inside a multi-node SLURM
    allocation, one launcher per node started by srun, all meeting at the first node."""
    env = os.environ if env is None else env
    entry = ["workflow.finetune.train", "--job", str(job_file)]
    hosts = slurm_hosts(env)
    if not hosts:
        if cfg.launcher == "deepspeed":
            return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(cfg.nproc_per_node),
                    "--master_port", str(free_port()), "--module", *entry]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc_per_node), "-m", *entry]
    rendezvous = ["--master_addr", hosts[0], "--master_port", str(free_port())]
    if cfg.launcher == "deepspeed":
        # DeepSpeed's own multi-node launch (pdsh/ssh) is replaced by srun: each node runs the runner with
        # --no_ssh and its --node_rank; the hostfile gives every node's slots.
        hostfile = job_file.parent / "hostfile"
        hostfile.write_text("".join(f"{host} slots={cfg.nproc_per_node}\n" for host in hosts))
        per_node = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", NODE_RANK,
                    *rendezvous, "--module", *entry]
    else:
        per_node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)), "--node_rank", NODE_RANK,
                    "--nproc_per_node", str(cfg.nproc_per_node), *rendezvous, "-m", *entry]
    script = "exec " + " ".join('"$SLURM_NODEID"' if arg is NODE_RANK else shlex.quote(arg) for arg in per_node)
    return ["srun", f"--nodes={len(hosts)}", f"--ntasks={len(hosts)}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "sh", "-c", script]


def launch_env(cfg: FinetuneConfig, run_id: str, tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_RUN_ID=run_id, MLFLOW_TRACKING_URI=tracking_uri)
    # The job's cores shared out among its ranks, one BLAS thread per core: oversubscribed CPU ranks run several
    # times slower. Snakemake sets OMP_NUM_THREADS to the job's threads; without it, the cores this process may use.
    cores = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    env["OMP_NUM_THREADS"] = str(max(1, cores // cfg.nproc_per_node))
    # DeepSpeed JIT-compiles ops on first use; keep them across runs and results directories.
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ft2prod" / "torch_extensions"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(cache))
    # Growable allocator segments: without them, blocks freed between the forward pass and the optimizer step stay
    # reserved in odd sizes (measured on an H200: 9-21 GiB reserved above the allocated peak of the 8B shape), and
    # gradient_checkpointing auto plans the allocated peak up to 90 % of the GPU. CPU runs ignore it.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


RESUMABLE = ("logging_steps", "save_steps", "save_total_limit", "dataloader_workers", "launcher", "attention", "liger_kernel",
             "torch_compile", "zero_tuning")
"""Finetune settings that change how training runs or reports, not what it computes or how checkpoints are laid out."""
LENGTH = ("epochs", "max_steps")
"""How long it trains: a longer run resumes from the checkpoints of a shorter one."""


def trained_from(cfg: FinetuneConfig, seed: int, model_dir: Path, data_dir: Path) -> dict:
    """What a checkpoint was trained from: settings (less RESUMABLE ones), seed, base model and training data."""
    return {
        "finetune": {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUMABLE},
        "seed": seed,
        "model_config": sha256_file(model_dir / "config.json"),
        "weights": sorted([p.name, p.stat().st_size] for p in model_dir.glob("*.safetensors")),  # as the job file holds it
        "train": sha256_file(data_dir / "train.jsonl"),
    }


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def changed_keys(old: dict, new: dict) -> list[str]:
    """Keys whose values differ, finetune settings named finetune.<key>."""
    keys = [f"finetune.{k}" for k in sorted(set(old.get("finetune", {})) | set(new["finetune"]))
            if old.get("finetune", {}).get(k) != new["finetune"].get(k)]
    return keys + [k for k in new if k != "finetune" and old.get(k) != new[k]]


def is_longer(old: dict, new: dict) -> bool:
    """Whether the new run trains at least as far as the old one (max_steps when both set it, else epochs)."""
    if old["max_steps"] != -1 and new["max_steps"] != -1:
        return new["max_steps"] >= old["max_steps"]
    return old["max_steps"] == new["max_steps"] == -1 and new["epochs"] >= old["epochs"]


def resumable(old: dict | None, new: dict) -> tuple[bool, list[str]]:
    """Whether checkpoints trained from `old` resume under `new`, and the keys that changed."""
    if old is None:
        return False, ["(checkpoints written without their settings)"]
    changed = changed_keys(old, new)
    others = [k for k in changed if k.removeprefix("finetune.") not in LENGTH]
    return not others and (not changed or is_longer(old["finetune"], new["finetune"])), changed


def keep_or_move_aside(checkpoint_dir: Path, parts: dict) -> None:
    """Keep the checkpoints when they resume under these settings; else move them aside, named, with a WARNING."""
    job_file = checkpoint_dir / "job.json"
    if not job_file.exists():
        return
    old = json.loads(job_file.read_text())
    ok, changed = resumable(old.get("trained_from"), parts)
    if ok:
        if changed:
            log.info("checkpoints in %s resume: only the run's length changed (%s)", checkpoint_dir, ", ".join(changed))
        return
    aside = checkpoint_dir.with_name(f"{checkpoint_dir.name}.{old.get('fingerprint', 'unknown')[:12]}")
    for n in itertools.count(1):
        if not aside.exists():
            break
        aside = aside.with_name(f"{checkpoint_dir.name}.{old.get('fingerprint', 'unknown')[:12]}-{n}")
    checkpoint_dir.rename(aside)
    log.warning("checkpoints in %s were trained with other settings (changed: %s): moved aside to %s, not resumed and not "
                "deleted (delete it when it is no longer wanted); training starts afresh", checkpoint_dir, ", ".join(changed), aside)


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_job(model_dir: Path, data_dir: Path, summary_path: Path, cfg: FinetuneConfig, seed: int,
              measure: Measurement = Measurement()) -> Path:
    """The job file the ranks read: settings, paths and the checkpoint to resume from (if it matches)."""
    checkpoint_dir = summary_path.parent / "checkpoints"
    job_file = checkpoint_dir / "job.json"
    parts = trained_from(cfg, seed, model_dir, data_dir)
    keep_or_move_aside(checkpoint_dir, parts)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    job = Job(finetune=cfg, seed=seed, model_dir=str(model_dir.resolve()), data_dir=str(data_dir.resolve()),
              checkpoint_dir=str(checkpoint_dir.resolve()), summary=str(summary_path.resolve()), fingerprint=fingerprint(parts),
              trained_from=parts, resume_from=latest_complete_checkpoint(checkpoint_dir.resolve()), measure=measure)
    job_file.write_text(job.model_dump_json(indent=2))
    return job_file


def finetune(model_dir: str | Path, data_dir: str | Path, summary_path: str | Path, cfg: FinetuneConfig, seed: int,
        tracking: Tracking, log_path: str | Path) -> dict:
    """Fine-tune model_dir on data_dir/train.jsonl; write summary_path naming the final checkpoint."""
    # MLflow is imported here, not at the top: benchmarks/finetune_throughput.py launches through this module
    # on GPU hosts that have no MLflow.
    import mlflow

    from workflow.tracking import describe, job_run

    model_dir, data_dir, summary_path = Path(model_dir), Path(data_dir), Path(summary_path)
    job_file = write_job(model_dir, data_dir, summary_path, cfg, seed)
    with job_run(tracking, "finetune", {"finetune": cfg.model_dump(mode="json"), "seed": seed, "base_model": str(model_dir)}) as run:
        env = launch_env(cfg, run.info.run_id, tracking.resolved_uri())
        built = ops.build(cfg, Path(env["TORCH_EXTENSIONS_DIR"]))
        log.info("DeepSpeed ops ready in %s: %s", env["TORCH_EXTENSIONS_DIR"], ", ".join(built) or "none needed")
        command = launch_command(cfg, job_file)
        log.info("launching: %s", " ".join(command))
        with open(log_path, "a") as sink:
            done = subprocess.run(command, check=False, env=env, stdout=sink, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"finetune: the {cfg.launcher} launcher exited with status {done.returncode}; see {log_path}")
        summary = json.loads(summary_path.read_text())
        plot = summary_path.parent / "loss.png"
        plot_loss(summary["log_history"], plot)
        mlflow.log_artifact(str(plot))
        mlflow.log_artifact(str(job_file))
        mlflow.log_metrics({"final_train_loss": summary["train_loss"], "global_step": summary["global_step"]})
        mlflow.set_tag("ft2prod.resumed_from", summary["resumed_from"] or "none")
        describe(f"{cfg.method} fine-tune, ZeRO-{cfg.zero_stage}, {cfg.nproc_per_node} processes ({cfg.launcher}): "
                 f"**{summary['global_step']}** steps, final train loss **{summary['train_loss']:.3f}**"
                 + (f", resumed from `{summary['resumed_from']}`." if summary["resumed_from"] else ".") + " Loss curve: `loss.png`.")
        return summary
