"""prepare_data: read the user's JSONL, check every row, drop duplicates, split, render with the chat template.

    python -c "from workflow.data import prepare_data; ..."   (normally run by `snakemake results/data/stats.json`)

Rows come in OpenAI chat form ({"messages": [{"role", "content", "reasoning_content"?}, ...]}), ShareGPT form
({"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...], "system"?}) or alpaca form
({"instruction", "input"?, "output", "system"?, "history"?}). An assistant turn's reasoning comes from
reasoning_content or from an inline <think>...</think> block in its content. workflow.chat renders each row the way
the model is served; each split file holds, per example, the messages a client sends (ending with the trained turn),
its answer, the token ids and labels that are -100 everywhere but on what the model generates.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from transformers import AutoTokenizer

from workflow.chat import END_THINK, ChatFormat, Example, TemplateError, split_reasoning
from workflow.config import DataConfig
from workflow.tracking import Tracking, describe, job_run, log_dataset

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset row that cannot be used, or a dataset that cannot be prepared."""


@dataclass
class Stats:
    rows_read: int = 0
    bad_rows: list[str] = field(default_factory=list)
    duplicates: int = 0
    too_long: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    assistant_tokens: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    chat_format: dict = field(default_factory=dict)
    reasoning_rows: int = 0
    """Rows whose trained turn has reasoning."""
    history_reasoning_untrained: int = 0
    """Earlier assistant turns whose reasoning the template strips from history (data.reasoning_turns: last)."""
    eval_overlap: int = 0
    """Rows of data.path also in evaluate.path, kept out of training."""


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _check_message(message: object, where: str, index: int) -> dict:
    """A checked chat message; an assistant turn's reasoning moves to reasoning_content, from an inline think
    block in its content if it has one."""
    if not isinstance(message, dict):
        raise DataError(f"{where}: messages[{index}] must be an object, got {type(message).__name__}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise DataError(f"{where}: messages[{index}].role must be one of {', '.join(ROLES)} (got {role!r})")
    if not isinstance(content, str):
        raise DataError(f"{where}: messages[{index}].content must be a string (got {type(content).__name__})")
    unknown = set(message) - {"role", "content", "reasoning_content"}
    if unknown:
        raise DataError(f"{where}: messages[{index}] has unknown keys {sorted(unknown)}")
    reasoning = message.get("reasoning_content")
    if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
        raise DataError(f"{where}: messages[{index}].reasoning_content must be a string on an assistant turn")
    if role != "assistant":
        return {"role": role, "content": content}
    try:
        inline_reasoning, answer = split_reasoning(content)
    except ValueError as err:
        raise DataError(f"{where}: messages[{index}].content has {err}") from None
    if inline_reasoning is not None and reasoning is not None:
        raise DataError(f"{where}: messages[{index}] has both reasoning_content and a {END_THINK} block in its "
                        "content; keep one")
    reasoning = inline_reasoning if reasoning is None else reasoning.strip()
    out = {"role": role, "content": answer.strip()}
    return out | ({"reasoning_content": reasoning} if reasoning else {})


def _sharegpt(row: dict, where: str) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            found = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
            raise DataError(f"{where}: conversations[{i}].from must be one of {', '.join(SHAREGPT_ROLES)} (got "
                            f"{found!r}); tool and function turns are not supported")
        unknown = set(turn) - {"from", "value", "reasoning_content"}
        if unknown:
            raise DataError(f"{where}: conversations[{i}] has unknown keys {sorted(unknown)}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")}
                        | ({"reasoning_content": turn["reasoning_content"]} if "reasoning_content" in turn else {}))
    return messages


def _alpaca(row: dict, where: str) -> list[dict]:
    instruction, extra, output = row.get("instruction"), row.get("input", ""), row.get("output")
    for key, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: alpaca row needs a non-empty string '{key}'")
    if not isinstance(extra, str):
        raise DataError(f"{where}: alpaca 'input' must be a string")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for pair in row.get("history") or []:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise DataError(f"{where}: alpaca 'history' must be a list of [instruction, response] pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def to_messages(row: object, where: str) -> list[dict]:
    """One JSONL row (OpenAI-style messages, ShareGPT conversations or alpaca) as checked chat messages ending with
    the answer; reasoning from reasoning_content or an inline think block sits in the turn's reasoning_content."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
    elif "conversations" in row:
        messages = _sharegpt(row, where)
    elif "instruction" in row or "output" in row:
        messages = _alpaca(row, where)
    else:
        raise DataError(f"{where}: expected 'messages' (chat form), 'conversations' (ShareGPT form) or "
                        f"'instruction'/'output' (alpaca form); found keys {sorted(row)}")
    messages = [_check_message(m, where, i) for i, m in enumerate(messages)]
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer (got role {messages[-1]['role']!r})")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: no user message")
    if not messages[-1]["content"]:
        raise DataError(f"{where}: the assistant's answer is empty")
    return messages


def read_rows(path: str | Path, on_bad_row: str, stats: Stats) -> list[tuple[str, list[dict]]]:
    """(file:line, messages) of every good row."""
    conversations = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            stats.rows_read += 1
            where = f"{path}:{number}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
                conversations.append((where, to_messages(row, where)))
            except DataError as err:
                if on_bad_row == "fail":
                    raise DataError(f"{err} (set data.on_bad_row: skip to drop such rows)") from None
                stats.bad_rows.append(str(err))
    if stats.bad_rows:
        log.warning("skipped %d bad rows, first: %s", len(stats.bad_rows), stats.bad_rows[0])
    return conversations


def read_split(path: str | Path, limit: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(limit), handle)]


def split_of(messages: list[dict], cfg: DataConfig, seed: int) -> str:
    """A row's split from a hash of its content and the seed: stable when rows are added or reordered."""
    key = f"{seed}:{json.dumps(messages, sort_keys=True)}".encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    return "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


def examples(messages: list[dict], fmt: ChatFormat, where: str, stats: Stats) -> list[Example]:
    """The training examples of one conversation: its last assistant turn, or every one (reasoning_turns: all)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    try:
        made = [fmt.example(messages, upto=i) for i in turns] if fmt.reasoning_turns == "all" else [fmt.example(messages)]
    except TemplateError as err:
        raise DataError(f"{where}: the model's chat template ({fmt.style} style) cannot train this row: {err}") from None
    trained = {i for example in made for i in example.trained_turns}
    stats.history_reasoning_untrained += sum(1 for i in turns if i not in trained and messages[i].get("reasoning_content"))
    stats.reasoning_rows += sum(1 for example in made if messages[example.trained_turns[-1]].get("reasoning_content"))
    return made


def split_rows(source: str | Path, eval_path: str | Path | None, fmt: ChatFormat, cfg: DataConfig, seed: int,
               stats: Stats) -> dict[str, list[dict]]:
    """The rendered examples of each split: source's rows split by hash, or, with eval_path (evaluate.path), source's
    rows all in train/val and eval_path's rows the test split (rows of both kept out of training)."""
    sources = [(source, False)] + ([(eval_path, True)] if eval_path else [])
    conversations = {is_eval: read_rows(path, cfg.on_bad_row, stats) for path, is_eval in sources}
    held_out = {json.dumps(messages, sort_keys=True) for _, messages in conversations.get(True, [])}
    seen, splits = set(), {name: [] for name in SPLITS}
    for is_eval, rows in sorted(conversations.items(), reverse=True):
        for where, messages in rows:
            key = json.dumps(messages, sort_keys=True)
            if not is_eval and key in held_out:
                stats.eval_overlap += 1
                continue
            if key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
            try:
                made = examples(messages, fmt, where, stats)
            except DataError as err:
                if cfg.on_bad_row == "fail":
                    raise DataError(f"{err} (set data.on_bad_row: skip to drop such rows)") from None
                stats.bad_rows.append(str(err))
                continue
            split = "test" if is_eval else split_of(messages, cfg, seed)
            if eval_path and not is_eval and split == "test":
                split = "train"
            for example in made:
                if len(example.input_ids) > cfg.max_seq_len:
                    stats.too_long += 1
                    continue
                splits[split].append({"messages": example.messages, "answer": example.answer,
                                      "input_ids": example.input_ids, "labels": example.labels})
    return splits


def prepare_data(source: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, cfg: DataConfig, tracking: Tracking,
                 seed: int, eval_path: str | Path | None = None) -> Stats:
    """Read, check, deduplicate, split (by `seed`, the config's) and render `source` into out_dir/{train,val,test}.jsonl
    and stats.json; with eval_path (evaluate.path) its rows are the test split instead of a random share of source."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with job_run(tracking, "prepare_data", {"data": cfg.model_dump(), "seed": seed, "source": str(source),
                                            "evaluation_source": str(eval_path)}):
        stats = Stats()
        stats.digests["source"] = log_dataset(source, "source", "raw")
        if eval_path:
            stats.digests["evaluation_source"] = log_dataset(eval_path, "evaluation_source", "raw")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        try:
            fmt = ChatFormat.probe(tokenizer, cfg.chat_template, cfg.reasoning_turns, str(tokenizer_dir))
        except TemplateError as err:
            raise DataError(f"prepare_data: {err}") from None
        stats.chat_format = {"style": fmt.style, "template": fmt.source if fmt.training_template else "model",
                             "template_sha256": fmt.template_sha256}
        log.info("chat format: %s", json.dumps(stats.chat_format))
        splits = split_rows(source, eval_path, fmt, cfg, seed, stats)
        for name, rows in splits.items():
            if not rows and name != "val":
                where = "evaluate.path has no usable row" if name == "test" and eval_path else f"change data.{name}_fraction"
                raise DataError(f"prepare_data: the {name} split is empty ({stats.rows_read} rows read); add rows or {where}")
            path = out_dir / f"{name}.jsonl"
            with open(path, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
            stats.rows[name] = len(rows)
            stats.assistant_tokens[name] = sum(sum(t != -100 for t in row["labels"]) for row in rows)
            stats.digests[name] = log_dataset(path, name, {"train": "training", "val": "validation"}.get(name, "testing"))
        mlflow.log_metrics(
            {"rows_read": stats.rows_read, "bad_rows": len(stats.bad_rows), "duplicates": stats.duplicates, "too_long": stats.too_long,
             "eval_overlap": stats.eval_overlap,
             "reasoning_rows": stats.reasoning_rows, "history_reasoning_untrained": stats.history_reasoning_untrained}
            | {f"rows_{k}": v for k, v in stats.rows.items()}
        )
        mlflow.log_params({f"chat_format.{k}": v for k, v in stats.chat_format.items()})
        if stats.history_reasoning_untrained:
            log.warning("%d earlier assistant turns keep their reasoning out of training: the model's template strips it "
                        "from history (data.reasoning_turns: last); set data.reasoning_turns: all to train each turn "
                        "with its reasoning", stats.history_reasoning_untrained)
        (out_dir / "stats.json").write_text(json.dumps(stats.__dict__, indent=2))
        mlflow.log_artifact(str(out_dir / "stats.json"))
        describe(f"{stats.rows_read} rows read from `{source}`: {len(stats.bad_rows)} bad, {stats.duplicates} duplicates, "
                 f"{stats.too_long} longer than {cfg.max_seq_len} tokens. Splits: "
                 + ", ".join(f"{k} **{v}** rows" for k, v in stats.rows.items()) + f". Source sha256 `{stats.digests['source']}`. "
                 f"Chat format: **{stats.chat_format['style']}** ({stats.reasoning_rows} examples with reasoning).")
        log.info("prepared %s", json.dumps({k: v for k, v in stats.__dict__.items() if k != "bad_rows"}))
        return stats
