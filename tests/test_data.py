import json

import pytest
from transformers import AutoTokenizer

from workflow.chat import ChatFormat
from workflow.data import DataConfig, DataError, Stats, prepare_data, read_rows, split_of, to_messages

CHAT = {"messages": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "reasoning_content": "2 + 3 = 5", "content": "The answer is 5."}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_alpaca_rows_become_chats():
    messages = to_messages({"instruction": "Add", "input": "2 and 3", "output": "5"}, "f:1")
    assert messages == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]


def test_sharegpt_rows_and_inline_reasoning_become_chats():
    row = {"system": "Be brief.", "conversations": [{"from": "human", "value": "2 + 3?"},
                                                    {"from": "gpt", "value": "<think>\n2 + 3 = 5\n</think>\n\nThe answer is 5."}]}
    assert to_messages(row, "f:1") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
                                       {"role": "assistant", "content": "The answer is 5.", "reasoning_content": "2 + 3 = 5"}]
    # R1-style generations carry </think> without the opening tag (the prompt opened it)
    assert to_messages({"instruction": "q", "output": "2 + 3 = 5\n</think>\n\nThe answer is 5."}, "f:2")[-1] == \
        {"role": "assistant", "content": "The answer is 5.", "reasoning_content": "2 + 3 = 5"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "hi"}, "expected 'messages' (chat form), 'conversations' (ShareGPT form) or 'instruction'/'output' (alpaca form); found keys ['text']"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role must be one of system, user, assistant (got 'bot')"),
        ({"messages": [{"role": "user", "content": "x"}]}, "the last message must be the assistant's answer"),
        ({"messages": [{"role": "user", "content": "x", "reasoning_content": "y"}, {"role": "assistant", "content": "z"}]},
         "reasoning_content must be a string on an assistant turn"),
        ({"instruction": "x", "output": ""}, "alpaca row needs a non-empty string 'output'"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_bad_rows_are_named(row, message):
    with pytest.raises(DataError) as err:
        to_messages(row, "data.jsonl:7")
    assert str(err.value).startswith("data.jsonl:7: ")
    assert message in str(err.value)


def test_fail_policy_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, CHAT, "{not json", CHAT])
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON .*data.on_bad_row: skip"):
        read_rows(path, "fail", Stats())


def test_skip_policy_drops_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, "{not json", {"text": 1}, "", CHAT])
    stats = Stats()
    rows = read_rows(path, "skip", stats)
    assert len(rows) == 2
    assert stats.rows_read == 4
    assert [b.split(": ")[0] for b in stats.bad_rows] == [f"{path}:2", f"{path}:3"]


def test_split_is_deterministic_and_depends_on_seed():
    rows = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}] for i in range(400)]
    cfg = DataConfig(val_fraction=0.1, test_fraction=0.2)
    first = [split_of(r, cfg, 0) for r in rows]
    assert first == [split_of(r, cfg, 0) for r in rows]
    assert 40 < first.count("test") < 120 and 15 < first.count("val") < 70
    assert first != [split_of(r, cfg, 1) for r in rows]


def test_labels_cover_exactly_the_assistant_turns(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    messages = [
        {"role": "user", "content": "Ana has 2 pens. How many?"},
        {"role": "assistant", "reasoning_content": "2 + 0 = 2", "content": "The answer is 2."},
        {"role": "user", "content": "And now with 1 more?"},
        {"role": "assistant", "content": "The answer is 3."},
    ]
    example = ChatFormat.probe(tokenizer).example(to_messages({"messages": messages}, "row"))
    input_ids, labels = example.input_ids, example.labels
    assert len(input_ids) == len(labels)
    trained = tokenizer.decode([t for t in labels if t != -100])
    assert trained == ("2 + 0 = 2\n</think>\n\nThe answer is 2." + tokenizer.eos_token
                       + "</think>\n\nThe answer is 3." + tokenizer.eos_token)
    assert "Ana has" not in trained and "<｜User｜>" not in trained


def test_prepare_deduplicates_splits_and_records(tmp_path, tiny_base, tracking):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(200)]
    source = write_jsonl(tmp_path / "d.jsonl", rows + rows[:30] + [{"instruction": "x" * 5000, "output": "y"}])
    stats = prepare_data(source, tiny_base, tmp_path / "out", DataConfig(max_seq_len=128, test_fraction=0.2), tracking, seed=0)
    assert stats.duplicates == 30 and stats.too_long == 1
    assert sum(stats.rows.values()) == 200
    written = {name: (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines() for name in ("train", "val", "test")}
    assert {name: len(lines) for name, lines in written.items()} == stats.rows
    assert len(stats.digests["train"]) == 64
    test_row = json.loads(written["test"][0])
    assert set(test_row) == {"messages", "answer", "input_ids", "labels"}


def test_prepare_fails_on_empty_test_split(tmp_path, tiny_base, tracking):
    source = write_jsonl(tmp_path / "d.jsonl", [CHAT])
    with pytest.raises(DataError, match="the test split is empty"):
        prepare_data(source, tiny_base, tmp_path / "out", DataConfig(test_fraction=0.01), tracking, seed=0)


def test_a_users_evaluation_file_is_the_test_split(tmp_path, tiny_base, tracking):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(60)]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    # ShareGPT and alpaca rows are accepted as in data.path; one row of the training data is also in the evaluation file
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [
        {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris, of course."}]},
        {"instruction": "Name a primary colour.", "output": "Red"},
        rows[5],
    ])
    stats = prepare_data(source, tiny_base, tmp_path / "out", DataConfig(max_seq_len=128, test_fraction=0.3), tracking,
                         seed=0, eval_path=evaluation)
    test = [json.loads(line) for line in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    assert [row["answer"] for row in test] == ["Paris, of course.", "Red", "a5"]
    assert stats.eval_overlap == 1  # kept out of training
    assert stats.rows["train"] + stats.rows["val"] == 59  # the random test share trains instead
    trained = (tmp_path / "out" / "train.jsonl").read_text() + (tmp_path / "out" / "val.jsonl").read_text()
    assert '"a5"' not in trained
    assert len(stats.digests["evaluation_source"]) == 64


def test_a_bad_row_of_the_evaluation_file_is_named_by_file_and_line(tmp_path, tiny_base, tracking):
    source = write_jsonl(tmp_path / "d.jsonl", [CHAT])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [CHAT, {"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(DataError, match=rf"{evaluation}:2: the last message must be the assistant's answer"):
        prepare_data(source, tiny_base, tmp_path / "out", DataConfig(), tracking, seed=0, eval_path=evaluation)
