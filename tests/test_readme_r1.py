"""The README's DeepSeek-R1 example, taken from README.md itself (so that a change there is tested): it passes the plan
on the published DeepSeek-R1-Distill-Qwen-7B config.json, and it runs to promotion on a tiny model carrying the
published R1-distill chat template. The example as it stood on 375b44e stops at plan time, naming the keys and fixes.
A copy of that run then takes three config changes in turn, each done by one invocation (issue 25 item 3)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, copy_of, jobs_planned, jobs_run, merge

import families
from workflow.bootstrap.problems import make_problems
from workflow.capacity import PlanError
from workflow.checks import installed
from workflow.config import settings
from workflow.plan import checked_plan
from workflow.schemes import BASELINE, SCHEMES

PUBLISHED_7B = Path(__file__).parent / "data" / "models" / "DeepSeek-R1-Distill-Qwen-7B"


def readme_r1() -> dict:
    """The YAML block of README.md that starts with `# r1.yaml`."""
    blocks = re.findall(r"```yaml\n(# r1\.yaml.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "README.md has one r1.yaml example"
    return yaml.safe_load(blocks[0])


def on_published_7b(config: dict, tmp_path: Path) -> dict:
    model = tmp_path / "DeepSeek-R1-Distill-Qwen-7B"
    shutil.copytree(PUBLISHED_7B, model)
    return config | {"base_model": str(model)}


def gpu_packages_missing(problems: list[str]) -> list[str]:
    """What the plan says only because this CPU machine lacks the GPU set-up (README: requirements-gpu.txt)."""
    return [p for p in problems if p.startswith("finetune.liger_kernel true") and not installed("liger_kernel")]


def test_readme_r1_config_passes_the_plan_on_the_published_7b_config(tmp_path):
    cfg = settings(on_published_7b(readme_r1(), tmp_path))
    try:
        result = checked_plan(cfg)
    except PlanError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:]]
        assert problems == gpu_packages_missing(problems), problems  # nothing else than the GPU packages missing here
        return
    assert result["fits"] and set(result["schemes"]) == set(cfg.quantize.schemes)
    assert all("dropped" not in s for s in result["schemes"].values())


def test_the_r1_example_as_it_stood_stops_at_plan_time_naming_both_keys_and_fixes(tmp_path):
    example = readme_r1()
    example["finetune"].pop("micro_batch_size")
    example["cluster"].pop("host_memory_gib")
    example.pop("rollout")
    example.pop("engine")  # the default CPU engine, as it stood
    with pytest.raises(PlanError) as err:
        checked_plan(settings(on_published_7b(example, tmp_path)))
    message = str(err.value)
    # the CPU engine's weights do not fit 16 GiB of host memory: the fix is the host memory or a GPU engine
    serving = next(line for line in message.splitlines() if "serving bf16 does not fit" in line)
    assert "cluster.host_memory_gib: 30" in serving and "tensorrt_llm" in serving and "smaller model" not in serving
    assert ("evaluate.max_new_tokens 4096 > rollout.gateway.limits.max_tokens 256: the canary asks the gateway for the "
            "evaluated length and gets a 400; set rollout.gateway.limits.max_tokens: 4096") in message
    assert "data.max_seq_len 8192 > rollout.gateway.limits.max_prompt_tokens 1024" in message
    # Without Liger's fused loss the default micro-batch of 16 x 8192 tokens needs 305 GiB per GPU; the example's 2 fits
    example["finetune"] |= {"liger_kernel": False}
    with pytest.raises(PlanError) as err:
        checked_plan(settings(on_published_7b(example, tmp_path / "no-liger")))
    assert ("training does not fit: 305 GiB per GPU > cluster.gpu_memory_gib 80 (ZeRO-2, 8 ranks, micro-batch 16 x 8192 tokens, "
            "28 of 28 layers checkpointed") in str(err.value)
    assert "smallest change that fits: finetune.micro_batch_size: 2" in str(err.value)


# What this 2-core CPU machine is, instead of the example's 8 GPUs (the cluster, the CPU engine), and the sizes that keep
# the run short; everything else (data.max_seq_len, the gateway's limits, the data settings, the training precision,
# the R1 template) is the README's.
SMALLEST = min(SCHEMES, key=lambda s: SCHEMES[s].weight_bytes)
THIS_MACHINE = {
    "cluster": {"gpus_per_node": 0, "host_memory_gib": 16},
    "finetune": {"nproc_per_node": 2, "micro_batch_size": 4, "max_steps": 8, "save_steps": 4, "logging_steps": 2},
    # A random-weight tiny model never ends its answer, so every evaluation (base, fine-tuned, each scheme, each
    # engine build's accuracy check, the canary) generates the whole budget: the README's 4,096 new tokens would run
    # for hours on 2 CPU cores. What runs here is the machinery, not the model's answers: 16 tokens are checked by the
    # plan against the README's gateway limits as 4,096 are, and the model's positions are the README's lengths.
    "evaluate": {"max_samples": 4, "batch_size": 4, "max_new_tokens": 16, "gate": {"min_accuracy": 0.0, "min_gain": -1.0}},
    # The README's example leaves quantize alone (all schemes); here the unquantized baseline, which the selected
    # engine is then built from, and the smallest (a calibrated scheme, from the bf16-trained weights). Every scheme
    # runs to promotion in test_workflow.py's whole DAG.
    "quantize": {"schemes": [BASELINE, SMALLEST], "calib_samples": 4, "max_accuracy_loss": TINY["quantize"]["max_accuracy_loss"],
                 "max_kl": TINY["quantize"]["max_kl"], "min_agreement": TINY["quantize"]["min_agreement"]},
    # The README's engine (pytorch) serves on a GPU; this machine has the CPU engine, which builds both schemes.
    "engine": {"backend": "onnxruntime"},
    "benchmark": TINY["benchmark"],
    "rollout": {"canary": {"samples": 2, "requests": 2}},
}


def r1_config(tmp: Path) -> dict:
    """The README's R1 config merged with THIS_MACHINE, on a tiny Qwen2 model with the published R1-distill template and
    data in the think form (both written under tmp)."""
    example = readme_r1()
    positions = example["data"]["max_seq_len"] + example["evaluate"]["max_new_tokens"]
    base = families.make("r1-distill-qwen", tmp / "base", shape={"max_position_embeddings": positions})
    data = tmp / "traces.jsonl"
    data.write_text("".join(json.dumps(p.as_row("think")) + "\n" for p in make_problems(120, seed=5)))
    return merge(merge(example, {"base_model": str(base), "data": {"path": str(data)}}), THIS_MACHINE)


@pytest.fixture(scope="module")
def r1_run(tmp_path_factory, snakemake) -> tuple[Path, dict]:
    """The README's R1 config run to promotion once per module: (its directory, its config)."""
    tmp = tmp_path_factory.mktemp("r1")
    config = r1_config(tmp)
    snakemake(tmp / "run", config)
    return tmp / "run", config


@pytest.mark.e2e
def test_readme_r1_config_promotes_on_a_tiny_r1_distill_model(r1_run):
    """The README's R1 config, merged with THIS_MACHINE (the hardware, and sizes a 2-core CPU runs in minutes), on
    a tiny Qwen2 model with the published R1-distill template and data in the think form, runs to promotion."""
    work, _ = r1_run
    example = readme_r1()
    results = work / "results"
    assert json.loads((results / "rollout" / "promoted.json").read_text())["production"] == "1"
    plan = json.loads((results / "plan" / "plan.json").read_text())
    assert plan["fits"] and plan["resolved"]["max_seq_len"] == example["data"]["max_seq_len"]
    assert json.loads((results / "model" / "ft2prod.json").read_text())["finetune"]["precision"] == example["finetune"]["precision"]


DELIVERY = {"select", "package", "register", "backup", "rollout", "promote", "summary", "all"}
ENGINE_JOBS = {"build_engine_onnxruntime", "benchmark_onnxruntime"}


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_one_invocation_reruns_what_a_change_affects_and_a_second_does_nothing(r1_run, tmp_path, snakemake):
    """On a copy of the README's R1 run, a benchmark, an evaluation and a fine-tune setting changed in turn: the dry
    run lists what the change affects, one real run runs exactly that (on 375b44e the benchmark change listed and ran
    the plan job alone), and a second run has nothing to do."""
    shared, config = r1_run
    work = copy_of(shared, tmp_path / "copy")
    changes = [
        ({"benchmark": {"output_len": config["benchmark"]["output_len"] - 2}}, {"plan", "benchmark_onnxruntime"} | DELIVERY, None),
        ({"evaluate": {"max_new_tokens": config["evaluate"]["max_new_tokens"] + 8}},  # longer: no answer cut short
         {"evaluate_base", "evaluate", "evaluate_quantized"} | ENGINE_JOBS | DELIVERY, None),
        # a longer run: resumes (item 4); the plan records the resolved finetune settings, so it is written again
        ({"finetune": {"max_steps": config["finetune"]["max_steps"] + 4}},
         {"plan", "finetune", "export", "evaluate", "quantize", "evaluate_quantized"} | ENGINE_JOBS | DELIVERY, "resuming from"),
    ]
    for change, affected, log_line in changes:
        config = merge(config, change)
        planned = jobs_planned(snakemake(work, config, "-n"))
        # Jobs behind a checkpoint that reruns (evaluate_quantized, select) join the DAG once it has run.
        behind = set() if "evaluate_quantized" not in affected else ENGINE_JOBS | DELIVERY
        assert planned - behind == affected - behind, f"{change}: the dry run planned {sorted(planned)}"
        done = snakemake(work, config)
        assert jobs_run(done) == affected, f"{change}: ran {sorted(jobs_run(done))}, expected {sorted(affected)}"
        again = snakemake(work, config, "-n")
        assert "Nothing to be done" in again.stdout + again.stderr, f"{change}: a second run would do {sorted(jobs_planned(again))}"
        if log_line:
            assert log_line in (work / "results" / "logs" / "finetune.log").read_text()
