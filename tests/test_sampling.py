"""Sampling (workflow/engine/sampling.py), the text a client gets (workflow/serve/output.py: stop strings, reasoning
split) and the request fields the gateway serves or refuses (workflow/serve/protocol.py), without a gateway."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from workflow.engine.sampling import (GREEDY, SamplingParams, TokenHistory, adjusted, generation_defaults, keep_mask,
                                      next_token)
from workflow.serve.output import ReasoningSplit, StopStrings, split_text
from workflow.serve.protocol import BadRequest, ChatRequest, CompletionRequest, check_sampling, sampling_params, upstream_body
from workflow.serve.settings import Limits

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03]))


def test_top_k_keeps_the_k_most_likely_and_top_p_the_nucleus():
    assert keep_mask(LOGITS, top_k=2).tolist() == [True, True, False, False, False]
    # 0.5 < 0.8, 0.75 < 0.8, 0.9 >= 0.8: the third token completes the nucleus, the rest go
    assert keep_mask(LOGITS, top_p=0.8).tolist() == [True, True, True, False, False]
    assert keep_mask(LOGITS, top_p=0.5).tolist() == [True, False, False, False, False]
    assert keep_mask(LOGITS, top_p=0.01).tolist() == [True, False, False, False, False], "the most likely always stays"
    assert keep_mask(LOGITS, top_k=4, top_p=0.8).tolist() == [True, True, True, False, False]
    assert keep_mask(np.array([1.0, 3.0, 3.0, 0.0]), top_k=1).tolist() == [False, True, True, False], "ties at the k-th stay"
    assert keep_mask(LOGITS).all()


def test_sampling_draws_only_what_the_masks_keep_in_proportion():
    rng = np.random.default_rng(0)
    drawn = Counter(next_token(LOGITS, SamplingParams(temperature=1.0, top_k=3), rng) for _ in range(4000))
    assert set(drawn) == {0, 1, 2}
    assert abs(drawn[0] / 4000 - 0.5 / 0.9) < 0.03 and abs(drawn[2] / 4000 - 0.15 / 0.9) < 0.03
    nucleus = Counter(next_token(LOGITS, SamplingParams(temperature=1.0, top_p=0.6), rng) for _ in range(500))
    assert set(nucleus) == {0, 1}
    cold = Counter(next_token(LOGITS, SamplingParams(temperature=0.05), rng) for _ in range(200))
    assert cold[0] == 200, "a low temperature sharpens towards the most likely"


def test_the_same_seed_gives_the_same_tokens_and_temperature_0_is_greedy():
    logits = np.random.default_rng(1).normal(size=1000)
    params = SamplingParams(temperature=1.5, seed=42)
    first = [next_token(logits, params, rng) for rng in [params.generator()] for _ in range(20)]
    again = [next_token(logits, params, rng) for rng in [params.generator()] for _ in range(20)]
    other = [next_token(logits, SamplingParams(temperature=1.5, seed=43), rng)
             for rng in [SamplingParams(seed=43).generator()] for _ in range(20)]
    assert first == again and first != other
    assert SamplingParams(seed=-5).generator().random() == SamplingParams(seed=-5).generator().random()
    assert {next_token(logits, GREEDY, np.random.default_rng(s)) for s in range(5)} == {int(logits.argmax())}


def test_logit_bias_and_penalties_move_the_logits():
    history = TokenHistory([3])
    history.add(1)
    history.add(1)
    out = adjusted(LOGITS, SamplingParams(logit_bias={4: 100.0}, presence_penalty=0.5, frequency_penalty=0.25), history)
    assert out[4] == pytest.approx(LOGITS[4] + 100)
    assert out[1] == pytest.approx(LOGITS[1] - 0.5 - 2 * 0.25) and out[3] == pytest.approx(LOGITS[3])
    assert next_token(LOGITS, SamplingParams(logit_bias={4: 100.0})) == 4
    repeated = adjusted(np.array([2.0, -2.0, 1.0, 1.0]), SamplingParams(repetition_penalty=2.0), TokenHistory([0, 1]))
    assert repeated.tolist() == [1.0, -4.0, 1.0, 1.0], "HF's: positive logits divided, negative multiplied"
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_defaults_come_from_generation_config_only_when_it_samples(tmp_path):
    assert generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95}  # DeepSeek-R1 distills' file
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    assert generation_defaults(tmp_path) == {}, "do_sample absent: Hugging Face decodes greedily"
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 0}))
    with pytest.raises(ValueError, match="generation_config.json"):
        generation_defaults(tmp_path)


def pieces(text: str) -> list[str]:
    cuts = sorted(random.sample(range(len(text) + 1), random.randint(0, len(text))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def streamed_split(text: str, opens: bool) -> dict:
    split, reasoning, answer = ReasoningSplit(opens), [], []
    for piece in [*pieces(text), None]:
        r, a = split.feed(piece) if piece is not None else split.finish()
        reasoning.append(r)
        answer.append(a)
    return split.message("".join(reasoning), "".join(answer))


@pytest.mark.parametrize(("text", "opens", "expected"), [
    ("Add them.\n</think>\n\nThe answer is 5", True, {"reasoning_content": "Add them.", "content": "The answer is 5"}),
    ("<think>\nAdd them.\n</think>\n\n5", False, {"reasoning_content": "Add them.", "content": "5"}),
    ("Still thinking when the tokens ran o", True, {"reasoning_content": "Still thinking when the tokens ran o", "content": None}),
    ("<think>\nhalf a thou", False, {"reasoning_content": "half a thou", "content": None}),
    ("The answer is 5 <think>", False, {"content": "The answer is 5 <think>"}),
    ("<thin", False, {"content": "<thin"}),
    ("R</think>", True, {"reasoning_content": "R", "content": None}),
])
def test_reasoning_is_split_the_same_whole_and_streamed(text, opens, expected):
    assert split_text(text, opens) == expected
    random.seed(0)
    for _ in range(40):
        assert streamed_split(text, opens) == expected


def test_stop_strings_cut_before_the_first_one_whatever_the_pieces():
    random.seed(1)
    for text, stop, expected in (("1 + 1 = 2. Next: 3", ("Next", ". N"), "1 + 1 = 2"), ("abcabd", ("abd",), "abc"),
                                 ("no stop here", ("xyz",), "no stop here")):
        for _ in range(40):
            cut, out = StopStrings(stop), []
            for piece in pieces(text):
                out.append(cut.feed(piece))
            out.append("" if cut.hit else cut.flush())
            assert "".join(out) == expected and cut.hit == (expected != text)


def chat(**fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | fields


@pytest.mark.parametrize(("fields", "named"), [
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"), ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"modalities": ["text", "audio"]}, "modalities"), ({"store": True}, "store"), ({"service_tier": "flex"}, "service_tier"),
    ({"audio": {"voice": "x"}}, "audio"), ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_fields_not_served_are_refused_naming_them(fields, named):
    with pytest.raises(BadRequest, match=rf"^{named}\b|^{named} ") as refused:
        check_sampling(ChatRequest(**chat(**fields)), "m")
    assert named in str(refused.value)


def test_no_effect_values_pass_and_unknown_fields_are_logged_not_forwarded(caplog):
    quiet = chat(logprobs=False, top_logprobs=0, tool_choice="none", response_format={"type": "text"}, modalities=["text"],
                 store=False, service_tier="auto", user="u1", metadata={"k": "v"}, parallel_tool_calls=True)
    check_sampling(ChatRequest(**quiet), "m")
    for refused in ({"echo": True}, {"best_of": 3}, {"suffix": "x"}, {"logprobs": 0}):
        with pytest.raises(BadRequest, match=next(iter(refused))):
            check_sampling(CompletionRequest(model="m", prompt="p", **refused), "m")
    req = ChatRequest(**chat(ignore_eos=True, min_tokens=5, temperature=0.7, seed=3, stop="\n", max_completion_tokens=9))
    with caplog.at_level("WARNING"):
        check_sampling(req, "m")
    assert "ignore_eos, min_tokens" in caplog.text
    body = upstream_body(req, Limits(max_tokens=32))
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "stream": False,
                    "temperature": 0.7, "seed": 3, "stop": "\n"}


def test_sampling_params_take_the_request_then_the_model_defaults():
    defaults = {"temperature": 0.6, "top_p": 0.95}
    assert sampling_params(ChatRequest(**chat()), defaults, 100) == SamplingParams(temperature=0.6, top_p=0.95)
    assert sampling_params(ChatRequest(**chat(temperature=0)), defaults, 100).greedy, "the canary's temperature 0 stays greedy"
    assert sampling_params(ChatRequest(**chat(top_k=-1, logit_bias={"7": -100})), {}, 100) == SamplingParams(logit_bias={7: -100.0})
    with pytest.raises(BadRequest, match="outside the vocabulary"):
        sampling_params(ChatRequest(**chat(logit_bias={"100": 1})), {}, 100)
