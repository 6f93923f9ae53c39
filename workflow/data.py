"""prepare_data: read the user's JSONL, check every row, drop duplicates, split, render with the chat template.

    python -c "from workflow.data import prepare; ..."   (normally run by `snakemake results/data/stats.json`)

Rows come in chat form ({"messages": [{"role", "content", "reasoning_content"?}, ...]}) or alpaca form
({"instruction", "input"?, "output"}). Each split file holds, per row, the messages, the token ids of the
rendered conversation and labels that are -100 everywhere but on assistant tokens (loss on the answer only).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from workflow.tracking import Tracking, describe, job_run, log_dataset

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset row that cannot be used, or a dataset that cannot be prepared."""


@dataclass(frozen=True)
class DataConfig:
    on_bad_row: str = "fail"
    """fail: stop at the first bad row naming file and line; skip: drop bad rows and count them."""
    val_fraction: float = 0.05
    test_fraction: float = 0.07
    max_seq_len: int = 256
    """Rows longer than this many tokens after rendering are dropped and counted."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.on_bad_row not in ("fail", "skip"):
            raise ValueError(f"data.on_bad_row must be one of fail, skip (got {self.on_bad_row!r})")


@dataclass
class Stats:
    rows_read: int = 0
    bad_rows: list[str] = field(default_factory=list)
    duplicates: int = 0
    too_long: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    assistant_tokens: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


def _check_message(message: object, where: str, index: int) -> dict:
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
    return {k: message[k] for k in ("role", "content", "reasoning_content") if message.get(k) is not None}


def to_messages(row: object, where: str) -> list[dict]:
    """One JSONL row, in chat or alpaca form, as a checked list of chat messages ending with the answer."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        messages = [_check_message(m, where, i) for i, m in enumerate(messages)]
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer (got role {messages[-1]['role']!r})")
        if not any(m["role"] == "user" for m in messages):
            raise DataError(f"{where}: no user message")
        if not messages[-1]["content"].strip():
            raise DataError(f"{where}: the assistant's answer is empty")
        return messages
    if "instruction" in row or "output" in row:
        instruction, extra, output = row.get("instruction"), row.get("input", ""), row.get("output")
        for key, value in (("instruction", instruction), ("output", output)):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: alpaca row needs a non-empty string '{key}'")
        if not isinstance(extra, str):
            raise DataError(f"{where}: alpaca 'input' must be a string")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    raise DataError(
        f"{where}: expected 'messages' (chat form) or 'instruction'/'output' (alpaca form); found keys {sorted(row)}"
    )


def read_rows(path: str | Path, on_bad_row: str, stats: Stats) -> list[list[dict]]:
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
                conversations.append(to_messages(row, where))
            except DataError as err:
                if on_bad_row == "fail":
                    raise DataError(f"{err} (set data.on_bad_row: skip to drop such rows)") from None
                stats.bad_rows.append(str(err))
    if stats.bad_rows:
        log.warning("skipped %d bad rows, first: %s", len(stats.bad_rows), stats.bad_rows[0])
    return conversations


def split_of(messages: list[dict], cfg: DataConfig) -> str:
    """A row's split from a hash of its content and the seed: stable when rows are added or reordered."""
    key = f"{cfg.seed}:{json.dumps(messages, sort_keys=True)}".encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    return "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


def render(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that keep only assistant tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise DataError(
                "the chat template does not render conversations prefix by prefix, so assistant tokens cannot be "
                "located; use a tokenizer whose template renders every turn (including reasoning_content) in place"
            )
        spans.append((len(prompt), len(upto)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(start <= begin < end for start, end in spans) else -100
        for token, (begin, _) in zip(encoded.input_ids, encoded.offset_mapping, strict=True)
    ]
    return encoded.input_ids, labels


def prepare(source: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, cfg: DataConfig, tracking: Tracking) -> Stats:
    """Read, check, deduplicate, split and render `source` into out_dir/{train,val,test}.jsonl and stats.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with job_run(tracking, "prepare_data", {"data": cfg.__dict__, "source": str(source)}):
        stats = Stats()
        stats.digests["source"] = log_dataset(source, "source", "raw")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if tokenizer.chat_template is None:
            raise DataError(f"the tokenizer in {tokenizer_dir} has no chat template")
        seen, splits = set(), {name: [] for name in SPLITS}
        for messages in read_rows(source, cfg.on_bad_row, stats):
            key = json.dumps(messages, sort_keys=True)
            if key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
            input_ids, labels = render(messages, tokenizer)
            if len(input_ids) > cfg.max_seq_len:
                stats.too_long += 1
                continue
            splits[split_of(messages, cfg)].append({"messages": messages, "input_ids": input_ids, "labels": labels})
        for name, rows in splits.items():
            if not rows and name != "val":
                raise DataError(f"prepare_data: the {name} split is empty ({stats.rows_read} rows read); add rows or change data.{name}_fraction")
            path = out_dir / f"{name}.jsonl"
            with open(path, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
            stats.rows[name] = len(rows)
            stats.assistant_tokens[name] = sum(sum(t != -100 for t in row["labels"]) for row in rows)
            stats.digests[name] = log_dataset(path, name, {"train": "training", "val": "validation"}.get(name, "testing"))
        mlflow.log_metrics(
            {"rows_read": stats.rows_read, "bad_rows": len(stats.bad_rows), "duplicates": stats.duplicates, "too_long": stats.too_long}
            | {f"rows_{k}": v for k, v in stats.rows.items()}
        )
        (out_dir / "stats.json").write_text(json.dumps(stats.__dict__, indent=2))
        mlflow.log_artifact(str(out_dir / "stats.json"))
        describe(f"{stats.rows_read} rows read from `{source}`: {len(stats.bad_rows)} bad, {stats.duplicates} duplicates, "
                 f"{stats.too_long} longer than {cfg.max_seq_len} tokens. Splits: "
                 + ", ".join(f"{k} **{v}** rows" for k, v in stats.rows.items()) + f". Source sha256 `{stats.digests['source']}`.")
        log.info("prepared %s", json.dumps({k: v for k, v in stats.__dict__.items() if k != "bad_rows"}))
        return stats
