"""evaluate.metric: normalisation, contains, regex and the user's scorer, as units and on a model taught one free-form
answer; an lm-evaluation-harness task from a local YAML over local JSONL, run offline against that model; bad
metric settings named by key."""

import json
import shutil
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workflow.chat import ChatFormat
from workflow.config import ConfigError, EvalConfig, settings
from workflow.engine import onnxruntime
from workflow.evaluate import Completion, engine_scores, evaluate_model, gate_failures, score
from workflow.metrics import Grader, contains, exact, final_answer, grader, normalise

QUESTION = "How many apples are in the two crates?"
TAUGHT = {"reasoning_content": "500 + 500 = 1000", "content": "The total is 1,000 apples."}


@pytest.mark.parametrize(("a", "b"), [("The answer is 1,000.", "the answer is 1000"), ("  1000.0 ", "1000"),
                                      ("Yes!", "yes"), ("3.10", "3.1"), ("a\n\tb", "a b")])
def test_normalise_makes_equal_what_only_formatting_tells_apart(a, b):
    assert normalise(a) == normalise(b)


def test_normalise_keeps_what_differs():
    assert normalise("1.05") != normalise("1.5")
    assert normalise("v1.0.0") != normalise("v1.0")
    assert exact("15", "5") == 0.0


def test_contains_matches_whole_words_only():
    assert contains("So there are 1,000 apples.", "1000") == 1.0
    assert contains("So there are 15 apples.", "5") == 0.0
    assert contains("anything", "") == 0.0


def test_the_answer_is_after_the_think_block_or_the_whole_text():
    assert final_answer("x</think>y</think> z ", opens_think=False) == "z"
    assert final_answer("thinking and thinking", opens_think=True) is None  # the prompt opened it: truncated
    assert final_answer("<think>never closed", opens_think=False) is None
    assert final_answer(" Paris. ", opens_think=False) == "Paris."  # a model that does not think


def test_score_reads_the_mean_of_a_graded_metric_and_counts_format():
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "5"}] * 3
    completions = [Completion("r</think>it is 5", True), Completion("r</think>it is 6", True), Completion("r r", False)]
    metrics, results = score(rows, completions, Grader(contains, "contains accuracy", opens_think=True))
    assert metrics == {"accuracy": 1 / 3, "format_adherence": 2 / 3, "truncated_thinking": 1 / 3, "samples": 3}
    assert [r["score"] for r in results] == [1.0, 0.0, 0.0]


def test_gate_names_the_metric_its_value_and_the_threshold():
    gate = EvalConfig(gate={"min_accuracy": 0.5, "min_gain": 0.1}).gate
    assert gate_failures({"accuracy": 0.6}, {"accuracy": 0.1}, gate, "contains accuracy") == []
    assert gate_failures({"accuracy": 0.25}, {"accuracy": 0.2}, gate, "contains accuracy") == [
        "contains accuracy 0.250 < evaluate.gate.min_accuracy 0.500",
        "gain over base on contains accuracy +0.050 (base 0.200 -> 0.250) < evaluate.gate.min_gain 0.100",
    ]


def scorer_module(folder, body: str, name: str = "my_scorer"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    return folder


@pytest.mark.parametrize(
    ("evaluate", "message"),
    [
        ({"metric": "f1"}, "evaluate.metric: 'f1' is not allowed; allowed values: 'exact', 'contains', 'regex', 'scorer', 'lm_eval'"),
        ({"metric": "regex"}, "evaluate.pattern is required when evaluate.metric is regex"),
        ({"metric": "regex", "pattern": "total is \\d+"}, "has no capture group"),
        ({"metric": "regex", "pattern": "total is (\\d+"}, "is not a regular expression"),
        ({"metric": "scorer"}, "evaluate.scorer must be 'module:function'"),
        ({"metric": "scorer", "scorer": "no_such_module:score"}, "cannot import module 'no_such_module'"),
        ({"metric": "lm_eval"}, "evaluate.lm_eval.include_path (a folder of task YAML files) and evaluate.lm_eval.task"),
        ({"metric": "lm_eval", "lm_eval": {"include_path": "/nonexistent", "task": "t"}}, "is not a folder"),
    ],
)
def test_bad_metric_settings_name_the_key(evaluate, message):
    with pytest.raises(ConfigError) as err:
        settings({"evaluate": evaluate})
    assert message in str(err.value)
    assert "evaluate" in str(err.value)


def test_a_scorer_that_fails_to_import_or_has_the_wrong_signature_is_named(tmp_path):
    folder = scorer_module(tmp_path / "broken", "import not_installed_anywhere\n", "broken")
    with pytest.raises(ConfigError, match=r"evaluate.scorer 'broken:score': cannot import module 'broken' .*"
                                          r"ModuleNotFoundError: No module named 'not_installed_anywhere'"):
        settings({"evaluate": {"metric": "scorer", "scorer": "broken:score", "scorer_path": str(folder)}})
    folder = scorer_module(tmp_path / "sig", "def score(answer):\n    return True\nvalue = 3\n", "one_arg")
    with pytest.raises(ConfigError, match=r"score\(answer\) cannot be called as score\(answer, reference\)"):
        settings({"evaluate": {"metric": "scorer", "scorer": "one_arg:score", "scorer_path": str(folder)}})
    with pytest.raises(ConfigError, match=r"has no function 'value'"):
        settings({"evaluate": {"metric": "scorer", "scorer": "one_arg:value", "scorer_path": str(folder)}})


def test_a_scorer_returning_something_else_than_a_score_is_named(tmp_path):
    folder = scorer_module(tmp_path / "s", "def score(answer, reference):\n    return 'yes'\n", "wordy")
    cfg = EvalConfig(metric="scorer", scorer="wordy:score", scorer_path=str(folder))
    with pytest.raises(ValueError, match=r"evaluate.scorer 'wordy:score' returned 'yes'; it must return a bool or a number"):
        Grader(grader.__globals__["metric_function"](cfg), "s", False).score("a", "b")


# --- free-form answers of a real (tiny) model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def taught(tiny_base, tmp_path_factory):
    """The tiny base taught to answer QUESTION with TAUGHT (reasoning, then a free-form sentence), and a test split
    whose first row's reference is the right number written differently (1000) and second's a wrong one (999)."""
    out = tmp_path_factory.mktemp("taught")
    shutil.copytree(tiny_base, out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    example = ChatFormat.probe(tokenizer).example([{"role": "user", "content": QUESTION}, {"role": "assistant", **TAUGHT}])
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
    torch.manual_seed(0)
    for _ in range(150):
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.02:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out / "model")
    rows = [{"messages": example.messages, "answer": answer, "input_ids": example.input_ids, "labels": example.labels}
            for answer in ("1000", "999")]
    (out / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def scores(taught, **evaluate) -> tuple[dict, list[dict]]:
    return evaluate_model(taught / "model", taught / "test.jsonl", EvalConfig(max_new_tokens=40, **evaluate))


def test_the_taught_model_answers_in_free_form(taught):
    metrics, results = scores(taught)
    assert [r["answer"] for r in results] == [TAUGHT["content"]] * 2
    assert metrics["accuracy"] == 0.0  # exact: a sentence is not the number
    assert metrics["format_adherence"] == 1.0


def test_contains_regex_and_a_scorer_read_free_form_answers(taught, tmp_path):
    assert scores(taught, metric="contains")[0]["accuracy"] == 0.5
    metrics, results = scores(taught, metric="regex", pattern=r"total is (-?[\d,.]+)")
    assert metrics["accuracy"] == 0.5
    assert [r["correct"] for r in results] == [True, False]
    folder = scorer_module(tmp_path, """
        import re

        def numbers_close(answer, reference):
            found = [float(n.replace(",", "")) for n in re.findall(r"[\\d,]*\\d", answer)]
            return 1.0 if any(abs(n - float(reference)) <= 0.5 for n in found) else 0.25
    """)
    metrics, results = scores(taught, metric="scorer", scorer="my_scorer:numbers_close", scorer_path=str(folder))
    assert [r["score"] for r in results] == [1.0, 0.25]
    assert metrics["accuracy"] == pytest.approx(0.625)


LM_EVAL_TASK = """
task: apples
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<｜end▁of▁sentence｜>"]
  max_gen_toks: 40
  do_sample: false
filter_list:
  - name: number
    filter:
      - function: regex
        regex_pattern: "total is ([0-9,]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: [","]
"""


@pytest.fixture
def apples_task(tmp_path) -> dict:
    """evaluate.lm_eval settings of a local task over a local JSONL: QUESTION with references 1000 and 999."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "apples.jsonl"
    data.write_text("".join(json.dumps({"question": QUESTION, "answer": a}) + "\n" for a in ("1000", "999")))
    (tasks / "apples.yaml").write_text(LM_EVAL_TASK.format(data=data))
    return {"include_path": str(tasks), "task": "apples", "filter": "number"}


@pytest.mark.slow
def test_an_lm_eval_task_runs_offline_against_the_model(taught, apples_task, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # where a download would land: must stay empty
    metrics, results = scores(taught, metric="lm_eval", lm_eval=apples_task)
    assert metrics["accuracy"] == 0.5 and metrics["samples"] == 2
    assert [r["answer"] for r in results] == ["1,000", "1,000"] and [r["correct"] for r in results] == [True, False]
    assert metrics["perplexity"] > 0
    assert not (tmp_path / "hf_home").exists()
    with pytest.raises(ValueError, match=r"reports no 'acc,number' .* it reports: exact_match,number"):
        scores(taught, metric="lm_eval", lm_eval=apples_task | {"metric": "acc"})
    with pytest.raises(ConfigError, match=r"evaluate.lm_eval.task 'pears' is not defined in .*tasks found there: apples"):
        settings({"evaluate": {"metric": "lm_eval", "lm_eval": apples_task | {"task": "pears"}}})


@pytest.mark.slow
def test_a_built_engine_is_scored_on_the_metric_and_through_an_lm_eval_task(taught, apples_task, tmp_path):
    """The engine accuracy check's path: the ONNX Runtime engine built from the taught model, scored by contains on
    the test split and by the lm_eval task through lm-eval's generate_until."""
    onnxruntime.build(taught / "model", tmp_path / "engine", "bf16", "cpu", 32, 4, "sha")
    engine = onnxruntime.OrtEngine(tmp_path / "engine")
    tokenizer = AutoTokenizer.from_pretrained(taught / "model")
    rows = [json.loads(line) for line in (taught / "test.jsonl").read_text().splitlines()]
    metrics, results = engine_scores(engine, tokenizer, rows, EvalConfig(metric="contains", max_new_tokens=40))
    assert [r["answer"] for r in results] == [TAUGHT["content"]] * 2 and metrics["accuracy"] == 0.5
    metrics, results = engine_scores(engine, tokenizer, rows, EvalConfig(metric="lm_eval", lm_eval=apples_task))
    assert metrics["accuracy"] == 0.5 and [r["answer"] for r in results] == ["1,000", "1,000"]
