"""Each scheme quantized on the GPU by the quantize stage and its exported checkpoint read as the GPU engines'
ModelOpt loaders read it (workflow/exported.py), for a model shape users run.

    python benchmarks/gpu_export.py [--shape r1-distill-qwen-1.5b-4-layers] [--work /tmp/gpu-export]

A random-weight model of the shape (tests/families.py, the published R1-distill template), a few calibration rows,
then `workflow.quantize.quantize` per scheme with one GPU declared; prints each scheme's export record (format,
quant_algo, quantized layers, weight dtype, scales), the device and the peak memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tests.families import make
from workflow.config import Cluster, QuantizeConfig
from workflow.quantize import quantize
from workflow.schemes import SCHEMES
from workflow.tracking import Tracking

# DeepSeek-R1-Distill-Qwen-1.5B's widths (what each layer's tensors look like) with 4 of its 28 layers (the format is
# per layer; fewer layers keep the run short)
SHAPES = {"r1-distill-qwen-1.5b-4-layers": ("r1-distill-qwen", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=4,
                                                                    num_attention_heads=12, num_key_value_heads=2)),
          "tiny": ("r1-distill-qwen", {})}  # a try-out on a CPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="r1-distill-qwen-1.5b-4-layers", choices=SHAPES)
    parser.add_argument("--work", default=tempfile.mkdtemp(prefix="gpu-export-"))
    args = parser.parse_args()
    work = Path(args.work)
    family, shape = SHAPES[args.shape]
    model = make(family, work / "base", shape=shape)
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps({"input_ids": list(range(10 + i, 138 + i))}) + "\n" for i in range(8)))
    tracking = Tracking(uri=f"sqlite:///{work}/mlflow.db", experiment="gpu-export", results_dir=str(work / "results"))
    for scheme in SCHEMES:
        record = quantize(model, train, work / scheme, scheme, QuantizeConfig(calib_samples=8), tracking,
                          Cluster(gpus_per_node=1, gpu_memory_gib=139))
        print(json.dumps({"scheme": scheme, "device": record["device"], "gpu_peak_gib": record["gpu_peak_gib"],
                          "export": record["export"]}), flush=True)


if __name__ == "__main__":
    main()
