"""Multi-step arithmetic word problems with R1-style reasoning traces and checkable answers.

    python -m workflow.bootstrap.problems --rows 4000 --seed 0 [--format messages|think|sharegpt|alpaca] > data/reasoning.jsonl

Each row is a chat conversation: the user asks the question, the assistant thinks step by step in
`reasoning_content` and answers in `content` ("The answer is N."), so an evaluator can check the answer.
The other formats write the same problems the ways reasoning datasets ship them: reasoning inline as
`<think>...</think>` in the content, ShareGPT conversations, or alpaca rows with the think block in the output.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena"]
ITEMS = ["apples", "pens", "books", "coins", "cards", "eggs", "shells", "stamps", "marbles", "cups"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} from a friend", "receives {n} more"]
LOSSES = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}"]


FORMS = ("messages", "think", "sharegpt", "alpaca")


@dataclass(frozen=True)
class Problem:
    question: str
    steps: list[str]
    answer: int

    def as_chat(self) -> dict:
        return {
            "messages": [
                {"role": "user", "content": self.question},
                {
                    "role": "assistant",
                    "reasoning_content": "\n".join(self.steps),
                    "content": f"The answer is {self.answer}.",
                },
            ]
        }

    def as_row(self, form: str = "messages") -> dict:
        """The problem as a dataset row in one of FORMS."""
        reasoning, answer = "\n".join(self.steps), f"The answer is {self.answer}."
        thought = f"<think>\n{reasoning}\n</think>\n\n{answer}"
        if form == "messages":
            return self.as_chat()
        if form == "think":
            return {"messages": [{"role": "user", "content": self.question}, {"role": "assistant", "content": thought}]}
        if form == "sharegpt":
            return {"conversations": [{"from": "human", "value": self.question}, {"from": "gpt", "value": thought}]}
        if form == "alpaca":
            return {"instruction": self.question, "input": "", "output": thought}
        raise ValueError(f"format must be one of {', '.join(FORMS)} (got {form!r})")

    def as_text(self) -> str:
        """Plain prose, without the chat template or think block: what the base model pretrains on."""
        return f"{self.question} " + " ".join(self.steps) + f" So the answer is {self.answer}."


def make_problem(rng: random.Random, max_start: int = 20, max_steps: int = 3) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = total = rng.randint(2, max_start)
    clauses, steps = [], [f"{name} starts with {start} {item}."]
    for _ in range(rng.randint(2, max_steps)):
        if total > 1 and rng.random() < 0.5:
            n = rng.randint(1, total - 1)
            clauses.append(rng.choice(LOSSES).format(n=n))
            steps.append(f"{total} - {n} = {total - n}")
            total -= n
        else:
            n = rng.randint(1, 9)
            clauses.append(rng.choice(GAINS).format(n=n))
            steps.append(f"{total} + {n} = {total + n}")
            total += n
    question = (
        f"{name} has {start} {item}. {name} "
        + ", then ".join(clauses)
        + f". How many {item} does {name} have now?"
    )
    return Problem(question=question, steps=steps, answer=total)


def make_problems(rows: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(rows)]


def write_jsonl(path: str, rows: int, seed: int, tracking=None) -> None:
    """The generated dataset as chat-form JSONL, tracked as the pipeline's `generate_data` job."""
    from workflow.tracking import describe, job_run, log_dataset

    with job_run(tracking, "generate_data", {"rows": rows, "seed": seed}):
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(p.as_chat()) + "\n" for p in make_problems(rows, seed))
        digest = log_dataset(path, "generated", "raw")
        describe(f"**{rows}** rows (seed {seed}), sha256 `{digest}`.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=FORMS, default="messages")
    args = parser.parse_args()
    for problem in make_problems(args.rows, args.seed):
        sys.stdout.write(json.dumps(problem.as_row(args.format)) + "\n")


if __name__ == "__main__":
    main()
