"""Closeness to the source model of every scheme's quantized model and engine: the figures behind the defaults of
quantize.max_kl and quantize.min_agreement (docs/quantization-and-engines.md, "Closeness").

    PYTHONPATH=$PWD .venv/bin/python benchmarks/closeness.py                      # the embedded default's base model
    PYTHONPATH=$PWD .venv/bin/python benchmarks/closeness.py --family llama3-instruct
    PYTHONPATH=$PWD .venv/bin/python benchmarks/closeness.py --model results/model   # a fine-tuned model of a run

The model is the embedded default's bootstrap base model (workflow/bootstrap, the default BootstrapConfig: the
model the embedded default fine-tunes), a tiny random-weight model of a family of the test matrix (tests/families.py),
or a model folder. The test split is the workflow's own (generated arithmetic problems through prepare_data, with the
model's chat template); every scheme is quantized by the quantize stage (ModelOpt) and measured as evaluate_quantized
measures it, and its ONNX Runtime CPU engine (round-to-nearest and with the calibration folded in) as the engine check
does: teacher-forced next-token agreement, mean KL(source || candidate) and perplexity ratio over the reference answer
tokens of the first --rows test rows (workflow/closeness.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from workflow import closeness
from workflow.chat import prompt_ids
from workflow.bootstrap.model import make_base_model
from workflow.bootstrap.problems import generate_data
from workflow.config import BootstrapConfig, DataConfig, EngineConfig, QuantizeConfig
from workflow.data import prepare_data, read_split
from workflow.engine import onnxruntime
from workflow.engine.calibration import CalibrationError, fold_calibration
from workflow.generation import load_model
from workflow.quantize import QuantizeError, check_quantizable, quantize, quantized_model
from workflow.schemes import SCHEMES, buildable
from workflow.tracking import Tracking


def source_model(args, work: Path) -> tuple[Path, str]:
    if args.model:
        return args.model, str(args.model)
    model_dir = work / "model"
    if args.family:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import families

        if not (model_dir / "config.json").exists():
            families.make(args.family, model_dir)
        return model_dir, f"tests/families.py {args.family} (random weights)"
    if not (model_dir / "config.json").exists():
        make_base_model(BootstrapConfig(), model_dir)
    return model_dir, "embedded default: bootstrap base model (default BootstrapConfig)"


def engine_figures(model_dir: Path, quantized_dir: Path, scheme: str, rows: list[dict], prompts: list[list[int]],
                   reference, work: Path) -> dict[str, dict]:
    """The scheme's CPU engines, round-to-nearest and (where its recipe calibrates) with the calibration folded in."""
    if not buildable(scheme, "onnxruntime", "cpu"):
        return {}
    builds = {"rtn": model_dir}
    if SCHEMES[scheme].calibration:
        try:
            report = fold_calibration(model_dir, quantized_dir, scheme, work / "folded" / scheme, prompts)
            builds["calibrated"] = (work / "folded" / scheme, report)
        except CalibrationError as err:
            print(f"{scheme}: calibration not folded ({err})")
    out = {}
    for how, source in builds.items():
        engine_dir = work / "engines" / f"{scheme}-{how}"
        if not (engine_dir / "engine_manifest.json").exists():
            path, report = source if isinstance(source, tuple) else (source, None)
            onnxruntime.build(path, engine_dir, scheme, "cpu", 32, 4, "benchmark", work / "build.log", calibration=report)
        out[how] = closeness.compare(reference, closeness.engine_logits(engine_dir, EngineConfig()), rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--family", help="a family of tests/families.py")
    which.add_argument("--model", type=Path, help="a Hugging Face model folder")
    parser.add_argument("--rows", type=int, default=QuantizeConfig().closeness_rows, help="test rows measured")
    parser.add_argument("--calib-samples", type=int, default=QuantizeConfig().calib_samples)
    parser.add_argument("--work", type=Path, help="a work folder (reused: model, data, quantization, engines)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="ft2prod-closeness-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir, described = source_model(args, work)
    tracking = Tracking(uri=f"sqlite:///{work}/mlflow.db", experiment="closeness", results_dir=str(work))
    if not (work / "data" / "test.jsonl").exists():
        generate_data(str(work / "generated.jsonl"), 3000, 0, tracking)
        prepare_data(work / "generated.jsonl", model_dir, work / "data", DataConfig(), tracking, seed=0)
    rows = read_split(work / "data" / "test.jsonl", args.rows)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model: {described}; {len(rows)} test rows")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = closeness.model_logits(load_model(model_dir, torch.device("cpu")))
    figures = {}
    for scheme in SCHEMES:
        try:
            check_quantizable(model_dir, scheme)
        except QuantizeError as err:
            print(f"{scheme}: skipped ({err})")
            continue
        quantized_dir = work / "quantize" / scheme
        if not (quantized_dir / "quantize.json").exists():
            quantize(model_dir, work / "data" / "train.jsonl", quantized_dir, scheme, QuantizeConfig(calib_samples=args.calib_samples), tracking)
        state = quantized_dir / "modelopt_state.pth"
        model = quantized_model(model_dir, scheme, state=state if state.exists() else None)
        figures[f"{scheme} quantized model"] = closeness.compare(reference, closeness.model_logits(model), rows)
        prompts = [prompt_ids(tokenizer, row["messages"][:-1]) for row in rows[:4]]  # as the engine stage folds calibration
        for how, measured in engine_figures(model_dir, quantized_dir, scheme, rows, prompts, reference, work).items():
            figures[f"{scheme} engine ({how})"] = measured
    print(f"\n{'candidate':30} {'agreement':>10} {'mean KL':>10} {'ppl ratio':>10} {'tokens':>7}   (vs the source model)")
    for name, m in figures.items():
        print(f"{name:30} {m['next_token_agreement']:>10.4f} {m['mean_kl']:>10.5f} {m['perplexity_ratio']:>10.4f} {m['closeness_tokens']:>7}")
    print(f"took {time.perf_counter() - started:.0f} s; work folder {work}")


if __name__ == "__main__":
    main()
