"""The model matrix end to end: each family's tiny model, with its published chat template and one of the data
formats users have, through the real DAG's data stage; two of them (SERVED) on through fine-tuning, export,
evaluation and the baseline engine, then, through the gateway serving that engine packed, the served prompt tokens
equal the prompt tokens seen in training.

Each family runs only as far as what it checks: the quantization schemes, benchmarks, selection, packaging stage and
rollout are the same code for every family and run on the whole DAG to promotion in test_workflow.py; what differs by
architecture in quantization (ModelOpt and the calibration folded into the engine) is test_quantize.py's family test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import families
from test_serve import STOPPED, Served
from workflow.bootstrap.problems import make_problems
from workflow.chat import prompt_text
from workflow.package import archive
from workflow.package.kms import LocalKeyFile
from workflow.schemes import BASELINE

pytestmark = pytest.mark.e2e

# family -> (data format, fine-tuning method): every format and both methods across the matrix.
CASES = {
    "bootstrap-r1": ("messages", "full"),  # the default base model carrying the DeepSeek-R1-Distill template
    "r1-distill-qwen": ("think", "lora"),
    "r1-distill-llama": ("sharegpt", "full"),
    "llama3-instruct": ("alpaca", "full"),
    "qwen3": ("messages", "lora"),
}


def base_model(name: str, root: Path, tiny_base: Path) -> Path:
    if name != "bootstrap-r1":
        return families.make(name, root / "base")
    out = root / "base"
    shutil.copytree(tiny_base, out)
    (out / "chat_template.jinja").write_text((families.TEMPLATES / "deepseek_r1_distill.jinja").read_text())
    return out


# The families that run on past the data to a served engine, with the engine backend each is served on: both
# architectures (Qwen2, Llama), both methods, a think template and one without, both in-process backends (the PyTorch
# one as the GPU DAG serves it, on the CPU here). Qwen3's q/k norms meet the quantize and engine stages in
# test_quantize.py's family test, and the bootstrap model with the R1 template runs the whole DAG in test_workflow.py.
SERVED = {"r1-distill-qwen": "pytorch", "llama3-instruct": "onnxruntime"}


def run_family(name: str, tmp_path: Path, tiny_base: Path, snakemake, target: str, backend: str = "onnxruntime") -> tuple[Path, Path]:
    """The family's base model and its data in its format, through the DAG up to `target`; (base, results)."""
    form, method = CASES[name]
    base = base_model(name, tmp_path, tiny_base)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(p.as_row(form)) + "\n" for p in make_problems(200, seed=11)))
    work = tmp_path / "run"
    snakemake(work, {"base_model": str(base), "data": {"path": str(data)}, "finetune": {"method": method},
                     "quantize": {"schemes": [BASELINE]}, "engine": {"backend": backend}}, target)
    return base, work / "results"


def check_trained_rows(name: str, results: Path, tokenizer) -> tuple[dict, list[int]]:
    """The family's rows as prepare_data made them: its template's style, the reasoning and the answer in the trained
    target, the prompt as the template renders it. Returns a test row and its trained prompt tokens."""
    stats = json.loads((results / "data" / "stats.json").read_text())
    style = families.FAMILIES[name].style if name in families.FAMILIES else "think"
    assert stats["chat_format"]["style"] == style and stats["reasoning_rows"] == sum(stats["rows"].values())

    row = json.loads((results / "data" / "train.jsonl").read_text().splitlines()[0])
    target = tokenizer.decode([t for t in row["labels"] if t != -100])
    reasoning = row["messages"][-1].get("reasoning_content") or row["messages"][-1]["content"].split("</think>")[0]
    assert reasoning.strip().splitlines()[-1] in target and "</think>" in target and target.count(row["answer"]) == 1

    test_row = json.loads((results / "data" / "test.jsonl").read_text().splitlines()[0])
    prompt = prompt_text(tokenizer, test_row["messages"][:-1])
    trained_prompt = test_row["input_ids"][: next(i for i, t in enumerate(test_row["labels"]) if t != -100)]
    if style == "think":
        assert prompt.endswith("<｜Assistant｜><think>\n") and trained_prompt.count(tokenizer.bos_token_id) == 1
    return test_row, trained_prompt


@pytest.mark.parametrize("name", [name for name in CASES if name not in SERVED])
def test_family_prepares_its_format_with_its_template(name, tmp_path, tiny_base, snakemake):
    base, results = run_family(name, tmp_path, tiny_base, snakemake, "results/data/stats.json")
    check_trained_rows(name, results, AutoTokenizer.from_pretrained(base))


@pytest.mark.parametrize("name", SERVED)
def test_family_runs_the_dag_and_serves_the_prompt_it_trained(name, tmp_path, tiny_base, snakemake):
    engine = f"results/engine/{SERVED[name]}/{BASELINE}"
    base, results = run_family(name, tmp_path, tiny_base, snakemake, engine, SERVED[name])
    work = results.parent
    manifest = json.loads((work / engine / "engine_manifest.json").read_text())
    assert manifest["scheme"] == BASELINE and manifest["target"]["backend"] == SERVED[name]
    tokenizer = AutoTokenizer.from_pretrained(results / "model")
    # The exported model keeps the model's own template: what vLLM, TensorRT-LLM and ONNX Runtime GenAI serve with.
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(base).chat_template
    test_row, trained_prompt = check_trained_rows(name, results, tokenizer)
    evaluation = json.loads((results / "evaluate" / "finetuned.json").read_text())["metrics"]
    assert 0 <= evaluation["truncated_thinking"] <= 1

    # The engine folder as the DAG built it, packed as the package stage packs the selected one (archive.pack), then
    # through the gateway, with prompt logging on: the engine receives exactly the trained prompt's tokens.
    keys = tmp_path / "keys"
    keys.mkdir()
    archive.pack(work / engine, tmp_path / "model.ftpkg", LocalKeyFile(keys / "kek.bin", create=True),
                 archive.load_signing_key(keys / "signing.pem"), {}, 1 << 20)
    gateway = Served(tmp_path / "gateway", tmp_path / "model.ftpkg", keys_dir=keys,
                     overrides={"audit": {"path": str(tmp_path / "gateway" / "audit.jsonl"), "log_text": True,
                                          "key_file": str(tmp_path / "gateway" / "audit.key")},
                                "limits": {"max_body_bytes": 65536, "max_prompt_tokens": 1024, "max_tokens": 8}})
    try:
        gateway.wait_ready()
        reply = gateway.openai().chat.completions.create(model="tiny-model", messages=test_row["messages"][:-1], max_tokens=4)
        assert reply.usage.prompt_tokens == len(trained_prompt)
    finally:
        assert gateway.stop() in STOPPED
    served = [json.loads(line) for line in (tmp_path / "gateway" / "audit.jsonl").read_text().splitlines()]
    assert [r["text"]["prompt_tokens"] for r in served if "text" in r] == [trained_prompt]
