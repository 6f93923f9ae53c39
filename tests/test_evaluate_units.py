from workflow.evaluate import Completion, final_answer, gate_failures, score

ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is 5."}],
       "answer": "The answer is 5."}


def test_final_answer_is_text_after_the_last_think_block():
    assert final_answer("a\n</think>\n\nThe answer is 5.") == "The answer is 5."
    assert final_answer("x</think>y</think> z ") == "z"
    assert final_answer("never closed") is None


def test_score_counts_exact_answers_and_format():
    completions = [
        Completion("2 + 3 = 5\n</think>\n\nThe answer is 5.", ended=True),
        Completion("2 + 3 = 5\n</think>\n\nThe answer is 5.", ended=False),  # right answer, ran out of tokens
        Completion("2 + 3 = 6\n</think>\n\nThe answer is 6.", ended=True),
        Completion("2 + 3 = 5 and so on", ended=False),  # ran out of tokens while thinking
    ]
    metrics, results = score([ROW] * 4, completions)
    assert metrics == {"accuracy": 0.5, "format_adherence": 0.5, "truncated_thinking": 0.25, "samples": 4}
    assert [r["correct"] for r in results] == [True, True, False, False]


def test_gate_names_metric_value_and_threshold():
    assert gate_failures({"accuracy": 0.6}, {"accuracy": 0.1}, 0.5, 0.2) == []
    failures = gate_failures({"accuracy": 0.25}, {"accuracy": 0.2}, 0.5, 0.1)
    assert failures == [
        "accuracy 0.250 < evaluate.gate.min_accuracy 0.500",
        "gain over base +0.050 (base 0.200 -> 0.250) < evaluate.gate.min_gain 0.100",
    ]
