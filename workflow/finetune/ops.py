"""DeepSpeed's JIT-compiled ops, built once by the launcher before the ranks start.

DeepSpeed compiles some ops on first use with torch.utils.cpp_extension: with an offloaded optimizer its CPU Adam.
On a CPU host deepspeed.comm would also build its shared-memory all-reduce (90 s on 2 cores, once per machine) when
it starts; that op serves only DeepSpeed's inference all-reduce, never training's (gloo), so the ranks mark it
unavailable (`skip_inference_all_reduce`) and nothing builds it. cpp_extension's lock is a bare file, so a build killed
half way (scancel, the OOM killer, Ctrl-C) leaves it behind and every later load of that op waits on it forever.
The launcher therefore builds the ops itself while holding an flock on the extensions folder (the kernel
releases it whatever kills the holder); while it holds the flock no other launcher is building, so any lock
file it finds there is left by a build that died, and it removes it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from workflow.config import FinetuneConfig

log = logging.getLogger(__name__)


def needed(cfg: FinetuneConfig) -> list[str]:
    """The op builders DeepSpeed will JIT-load in the ranks of this run."""
    return ["CPUAdamBuilder"] if cfg.offload_optimizer else []


def build(cfg: FinetuneConfig, extensions_dir: Path) -> list[str]:
    """Build (or find built) every op the ranks need, in extensions_dir; returns the names of those built."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import __compatible_ops__

    accelerator = get_accelerator()
    extensions_dir.mkdir(parents=True, exist_ok=True)
    with open(extensions_dir / ".ft2prod-build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for stale in extensions_dir.glob("*/lock"):
            log.warning("removing %s, left by an op build that was killed (it would block every later build)", stale)
            stale.unlink()
        saved = os.environ.get("TORCH_EXTENSIONS_DIR")
        os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir)
        try:
            built = []
            for name in needed(cfg):
                builder = accelerator.create_op_builder(name)
                if builder is not None and __compatible_ops__.get(builder.NAME, False):
                    builder.load(verbose=False)
                    built.append(builder.NAME)
            return built
        finally:
            if saved is None:
                os.environ.pop("TORCH_EXTENSIONS_DIR")
            else:
                os.environ["TORCH_EXTENSIONS_DIR"] = saved


def skip_inference_all_reduce() -> None:
    """Keep deepspeed.comm from building its shared-memory all-reduce in this process: the op table DeepSpeed
    consults (`__compatible_ops__`, False where an op cannot build) marks it unavailable, as on a host without a
    compiler. Training's all-reduces go through the process group either way."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import __compatible_ops__

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        __compatible_ops__[builder.NAME] = False
