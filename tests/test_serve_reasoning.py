"""Reasoning output from a real thinking model: the tiny base taught one DeepSeek-R1-style answer (its chat template
opens `<think>\\n` in the generation prompt, so the model writes the reasoning, `</think>`, then the answer), with an
R1 distill's generation_config.json, packaged and served by the gateway, called with the official openai client."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_serve import MODEL, STOPPED, Served, streamed_said
from transformers import AutoModelForCausalLM, AutoTokenizer

from workflow.chat import prompt_ids
from workflow.engine import onnxruntime
from workflow.package import archive
from workflow.package.kms import LocalKeyFile

pytestmark = pytest.mark.slow  # teaches a model, builds and packs its engine, starts two gateways: minutes on 2 cores

QUESTION, THOUGHT, ANSWER = "What is 2 + 3?", "Two plus three: count three on from two.", "The answer is 5."
LIMITS = {"limits": {"max_body_bytes": 4096, "max_prompt_tokens": 64, "max_tokens": 128}}
R1_GENERATION_CONFIG = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}  # DeepSeek-R1-Distill-*'s published file


def teach(base, out, steps: int = 120) -> None:
    """The base model trained on one conversation until it answers it word for word (greedy)."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    prompt = prompt_ids(tokenizer, [{"role": "user", "content": QUESTION}])
    target = tokenizer(f"{THOUGHT}\n</think>\n\n{ANSWER}", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids, labels = torch.tensor([prompt + target]), torch.tensor([[-100] * len(prompt) + target])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.generation_config.update(**R1_GENERATION_CONFIG)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in ("chat_template.jinja",):
        if (base / name).exists() and not (out / name).exists():
            shutil.copyfile(base / name, out / name)


@pytest.fixture(scope="module")
def thinking_package(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("thinking")
    teach(tiny_base, root / "model")
    onnxruntime.build(root / "model", root / "engine", "bf16", "cpu", 32, 4, "test")
    assert json.loads((root / "engine" / "generation_config.json").read_text())["top_p"] == 0.95, "the defaults travel"
    archive.pack(root / "engine", root / "model.ftpkg", LocalKeyFile(root / "kek.bin", create=True),
                 archive.load_signing_key(root / "signing.pem"), {}, 1 << 20)
    return root / "model.ftpkg"


@pytest.fixture(scope="module")
def thinking(thinking_package):
    served = Served(thinking_package.parent / "gateway", thinking_package, LIMITS)
    served.wait_ready()
    yield served
    assert served.stop() in STOPPED


ASK = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 128}


def test_reasoning_and_answer_come_apart_plain_and_streamed(thinking):
    client = thinking.openai()
    plain = client.chat.completions.create(**ASK, temperature=0)
    message = plain.choices[0].message
    assert (message.reasoning_content, message.content, plain.choices[0].finish_reason) == (THOUGHT, ANSWER, "stop")
    chunks = list(client.chat.completions.create(**ASK, temperature=0, stream=True))
    assert streamed_said(chunks) == (THOUGHT, ANSWER)
    kinds = [("reasoning" if getattr(c.choices[0].delta, "reasoning_content", None) else "content")
             for c in chunks[1:] if c.choices and (c.choices[0].delta.content or getattr(c.choices[0].delta, "reasoning_content", None))]
    assert kinds == sorted(kinds, key=["reasoning", "content"].index) and len(set(kinds)) == 2, \
        "delta.reasoning_content first, then delta.content"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"


def test_thinking_cut_by_max_tokens_is_visible(thinking):
    client = thinking.openai()
    cut = client.chat.completions.create(**ASK | {"max_tokens": 4}, temperature=0)
    message = cut.choices[0].message
    assert cut.choices[0].finish_reason == "length" and message.content is None
    assert message.reasoning_content and THOUGHT.startswith(message.reasoning_content)
    streamed = list(client.chat.completions.create(**ASK | {"max_tokens": 4}, temperature=0, stream=True))
    assert streamed_said(streamed) == (message.reasoning_content, None) and streamed[-1].choices[0].finish_reason == "length"


def test_defaults_from_generation_config_and_seeds(thinking):
    assert thinking.http("analyst").get("/v1/deployment").json()["package"]["sampling_defaults"] == {"temperature": 0.6, "top_p": 0.95}
    client = thinking.openai()
    sampled = [client.chat.completions.create(**ASK, seed=seed).choices[0].message for seed in (1, 1)]
    assert sampled[0].content == sampled[1].content and sampled[0].reasoning_content == sampled[1].reasoning_content


def test_raw_setting_keeps_the_generated_text(thinking_package, tmp_path):
    served = Served(tmp_path / "raw", thinking_package, LIMITS | {"reasoning": "raw"})
    try:
        served.wait_ready()
        message = served.openai().chat.completions.create(**ASK, temperature=0).choices[0].message
        assert message.content == f"{THOUGHT}\n</think>\n\n{ANSWER}" and getattr(message, "reasoning_content", None) is None
    finally:
        assert served.stop() in STOPPED


def test_the_canary_compares_the_split_answers_with_the_engines_own(thinking, thinking_package):
    """rollout's generation check on a thinking model: the served (reasoning_content, content) equal the engine's own
    greedy generation split the same way, and the answer after the reasoning is scored."""
    from workflow.engine.onnxruntime import OrtEngine
    from workflow.evaluate import engine_completions
    from workflow.rollout import canary
    from workflow.rollout.stage import served_fields

    engine_dir = thinking_package.parent / "engine"
    tokenizer = AutoTokenizer.from_pretrained(engine_dir)
    rows = [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}], "answer": ANSWER}]
    completions = engine_completions(OrtEngine(engine_dir), tokenizer, rows, 96)
    reference = [served_fields(c.text, tokenizer, row, "split") for c, row in zip(completions, rows, strict=True)]
    assert reference == [{"reasoning_content": THOUGHT, "content": ANSWER}]
    check = canary.check_generation(thinking.openai(), MODEL, rows, reference, 96)
    assert check.passed and check.value == {"equal": 1, "accuracy": 1.0}, check.detail
