"""Chat formats on the templates users bring: what is trained after what prompt, for each model family."""

from __future__ import annotations

import json
import shutil

import families
import pytest
from transformers import AutoTokenizer

from workflow.bootstrap.model import CHAT_TEMPLATE
from workflow.bootstrap.problems import FORMS, make_problems
from workflow.chat import ChatFormat, TemplateError, prompt_ids, prompt_text
from workflow.config import EngineConfig
from workflow.data import DataConfig, DataError, prepare_data, to_messages
from workflow.quantize import check_quantizable

R1_PROMPT_END = "<｜Assistant｜><think>\n"
REASONING = "Ana starts with 2 pens.\n2 + 3 = 5"
CHAT = [{"role": "user", "content": "Ana has 2 pens and buys 3. How many?"},
        {"role": "assistant", "reasoning_content": REASONING, "content": "The answer is 5."}]


@pytest.fixture(scope="session")
def r1_base(tiny_base, tmp_path_factory):
    """A copy of the bootstrap base model carrying the DeepSeek-R1-Distill template instead of its own."""
    out = tmp_path_factory.mktemp("r1_base") / "model"
    shutil.copytree(tiny_base, out)
    (out / "chat_template.jinja").write_text((families.TEMPLATES / "deepseek_r1_distill.jinja").read_text())
    return out


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != -100])


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_each_family_trains_reasoning_after_its_served_prompt(family_dirs, name):
    tokenizer = AutoTokenizer.from_pretrained(family_dirs[name])
    fmt = ChatFormat.probe(tokenizer, "auto", "last", name)
    assert fmt.style == families.FAMILIES[name].style
    example = fmt.example(to_messages({"messages": CHAT}, "row"))
    served = prompt_ids(tokenizer, example.messages[:-1])
    assert example.input_ids[: example.prompt_len] == served
    assert all(label == -100 for label in example.labels[: example.prompt_len])
    target = trained_text(tokenizer, example)
    assert REASONING in target and "</think>" in target and target.index(REASONING) < target.index("</think>")
    assert target.rstrip("\n").endswith("The answer is 5." + tokenizer.eos_token)
    if fmt.style == "think":
        prompt = prompt_text(tokenizer, example.messages[:-1])
        assert prompt.endswith(R1_PROMPT_END) and served.count(tokenizer.bos_token_id) == 1 and served[0] == tokenizer.bos_token_id
        assert not target.startswith("<think>")  # the prompt opened the think block


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_every_data_format_gives_the_same_training_example(family_dirs, name):
    tokenizer = AutoTokenizer.from_pretrained(family_dirs[name])
    fmt = ChatFormat.probe(tokenizer, "auto", "last", name)
    problem = make_problems(1, seed=3)[0]
    made = {form: fmt.example(to_messages(problem.as_row(form), form)) for form in FORMS}
    assert len({tuple(e.input_ids) for e in made.values()}) == 1
    assert len({tuple(e.labels) for e in made.values()}) == 1


def test_r1_history_keeps_its_convention_and_all_trains_each_turn(family_dirs):
    tokenizer = AutoTokenizer.from_pretrained(family_dirs["r1-distill-qwen"])
    messages = to_messages({"messages": CHAT + [
        {"role": "user", "content": "And 1 more?"}, {"role": "assistant", "content": "<think>5 + 1 = 6</think>The answer is 6."}]}, "row")
    last = ChatFormat.probe(tokenizer, "auto", "last").example(messages)
    assert last.trained_turns == (3,)
    assert trained_text(tokenizer, last) == "5 + 1 = 6\n</think>\n\nThe answer is 6." + tokenizer.eos_token
    assert REASONING not in tokenizer.decode(last.input_ids)  # R1 strips reasoning from history, as when served
    every = [ChatFormat.probe(tokenizer, "auto", "all").example(messages, upto=i) for i in (1, 3)]
    assert REASONING in trained_text(tokenizer, every[0]) and "5 + 1 = 6" in trained_text(tokenizer, every[1])


def test_rows_without_reasoning_train_an_empty_think_block_on_r1(family_dirs):
    tokenizer = AutoTokenizer.from_pretrained(family_dirs["r1-distill-llama"])
    example = ChatFormat.probe(tokenizer).example(to_messages({"instruction": "Say hi", "output": "hi"}, "row"))
    assert trained_text(tokenizer, example) == "\n</think>\n\nhi" + tokenizer.eos_token


def test_the_own_template_keeps_training_every_turn(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    messages = to_messages({"messages": CHAT + [{"role": "user", "content": "More?"},
                                                {"role": "assistant", "content": "The answer is 6."}]}, "row")
    example = ChatFormat.probe(tokenizer).example(messages)
    assert example.trained_turns == (1, 3)
    assert trained_text(tokenizer, example) == (REASONING + "\n</think>\n\nThe answer is 5." + tokenizer.eos_token
                                                + "</think>\n\nThe answer is 6." + tokenizer.eos_token)


def test_prepare_with_the_r1_template_on_the_default_base(r1_base, tmp_path, tracking):
    rows = [p.as_row("messages") for p in make_problems(120, seed=5)]
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = prepare_data(source, r1_base, tmp_path / "out", DataConfig(test_fraction=0.2), tracking, seed=0)
    assert stats.chat_format["style"] == "think" and stats.reasoning_rows == 120
    tokenizer = AutoTokenizer.from_pretrained(r1_base)
    row = json.loads((tmp_path / "out" / "train.jsonl").read_text().splitlines()[0])
    target = tokenizer.decode([t for t in row["labels"] if t != -100])
    reasoning = row["messages"][-1]["reasoning_content"]
    assert target == f"{reasoning}\n</think>\n\n{row['answer']}{tokenizer.eos_token}"
    test_row = json.loads((tmp_path / "out" / "test.jsonl").read_text().splitlines()[0])
    assert prompt_text(tokenizer, test_row["messages"][:-1]).endswith(R1_PROMPT_END)
    assert prompt_ids(tokenizer, test_row["messages"][:-1]).count(tokenizer.bos_token_id) == 1


def test_a_training_template_must_render_the_served_prompt(r1_base, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(r1_base)
    # The bootstrap template renders reasoning in place and R1's prompt exactly: a valid training template for R1.
    own = tmp_path / "own.jinja"
    own.write_text(CHAT_TEMPLATE)
    fmt = ChatFormat.probe(tokenizer, str(own), "last")
    assert trained_text(tokenizer, fmt.example(to_messages({"messages": CHAT}, "r"))).startswith(REASONING)
    other = tmp_path / "other.jinja"
    other.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(TemplateError, match="renders the prompt differently from the model's own template"):
        ChatFormat.probe(tokenizer, str(other), "last")


def test_templates_that_cannot_train_reasoning_are_refused_by_name(r1_base, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(r1_base)
    with pytest.raises(TemplateError, match=r"the chat template of r1 cannot be made to train reasoning \(in_place: .*; inline: .*\); use data.chat_template: auto"):
        ChatFormat.probe(tokenizer, "model", "last", source="r1")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'].split('</think>')[-1] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}<gen>{% endif %}")
    with pytest.raises(TemplateError, match=r"the chat template of odd cannot be made to train reasoning .*"
                                            r"data.chat_template: /path/to/template.jinja"):
        ChatFormat.probe(tokenizer, "auto", "last", source="odd")


@pytest.mark.parametrize("row, message", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
     "conversations\\[1\\].from must be one of human, user, gpt, assistant, system \\(got 'function_call'\\)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>a",
                                                      "reasoning_content": "r"}]}, "both reasoning_content and a </think> block"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>never closed"}]},
     "an unclosed <think> block"),
    ({"instruction": "q", "output": "<think>a</think><think>b</think>c"}, "more than one <think> block"),
    ({"instruction": "q", "output": "<think>only thinking</think>"}, "the assistant's answer is empty"),
])
def test_bad_reasoning_rows_name_file_and_line(tmp_path, tiny_base, tracking, row, message):
    good = [p.as_row("messages") for p in make_problems(30, seed=1)]
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in good[:7] + [row] + good[7:]))
    with pytest.raises(DataError, match=f"{source}:8: .*{message}"):
        prepare_data(source, tiny_base, tmp_path / "out", DataConfig(), tracking, seed=0)


def test_a_shape_128_does_not_divide_takes_awq_groups_of_64(family_dirs):
    assert check_quantizable(family_dirs["qwen3"], "int4_awq") == 64  # intermediate 320 = 5 x 64
    assert check_quantizable(family_dirs["qwen3"], "int8_sq") == 1


def test_a_template_that_serves_with_thinking_off_trains_answers_and_refuses_reasoning(r1_base, tmp_path, tracking):
    """Qwen3.5's small models close the think block in the generation prompt: reasoning trained after it would
    teach a second think block the served model never writes, so such rows stop with file and line."""
    base = tmp_path / "nothink"
    shutil.copytree(r1_base, base)
    (base / "chat_template.jinja").write_text((families.TEMPLATES / "qwen3_5_nothink.jinja").read_text())
    tokenizer = AutoTokenizer.from_pretrained(base)
    fmt = ChatFormat.probe(tokenizer, "auto", "last", "nothink")
    example = fmt.example(to_messages({"instruction": "Say hi", "output": "hi"}, "row"))
    assert prompt_text(tokenizer, example.messages[:-1]).endswith("<think>\n\n</think>\n\n")
    assert trained_text(tokenizer, example).startswith("hi<|im_end|>") and "<think>" not in trained_text(tokenizer, example)
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)] + [{"instruction": "q", "output": "<think>r</think>a"}]
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{source}:41: .*closes the think block \(the template serves with thinking off\)"):
        prepare_data(source, base, tmp_path / "out", DataConfig(test_fraction=0.2), tracking, seed=0)


def test_a_row_the_template_itself_refuses_names_file_and_line(r1_base, tmp_path, tracking):
    """Templates raise on conversations they do not take (Gemma: "System role not supported"): that row's error."""
    base = tmp_path / "strict"
    shutil.copytree(r1_base, base)
    (base / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ '<｜' + m['role'] + '｜>' + m['content'] }}{% endfor %}{% if add_generation_prompt %}<｜assistant｜>{% endif %}")
    rows = [p.as_row("think") for p in make_problems(30, seed=2)]
    rows.insert(4, {"system": "Be brief.", "instruction": "q", "output": "a"})
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{source}:5: .*the chat template refuses the conversation: System role not supported"):
        prepare_data(source, base, tmp_path / "out", DataConfig(), tracking, seed=0)


def test_the_gateway_answers_a_conversation_the_template_refuses_with_a_400(r1_base):
    from workflow.serve.backends import InProcess
    from workflow.serve.protocol import BadRequest

    backend = InProcess(EngineConfig())
    backend.engine, backend.tokenizer = "loaded", AutoTokenizer.from_pretrained(r1_base)
    backend.tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                       "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    assert backend.chat_text([{"role": "user", "content": "hi"}])
    with pytest.raises(BadRequest, match="System role not supported") as refused:
        backend.chat_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert refused.value.status == 400
