"""The gateway's audit log: append-only JSON lines, chained with a key so that an edited, deleted or reordered
record is detected, even by someone who can write the log; pruned after the retention period without breaking
verification.

    python -m workflow.serve audit verify [--log audit/gateway.jsonl]

Each record carries `seq`, `prev` (the previous record's hash) and `hash` = HMAC-SHA256(audit key, prev + the
record's canonical JSON without `hash`). The audit key (`rollout.gateway.audit.key_file`, 32 bytes, owner-only)
lives apart from the log: whoever can write the audit volume but not read the key cannot recompute the chain.
Pruning drops records older than the retention period and writes an anchor (`<log>.anchor.json`: the first kept
record's seq and prev) and then a chained `audit.prune` event naming the same anchor, so the kept chain still
verifies and moving the anchor breaks it. Only one writer appends: the gateway holds an exclusive lock on
`<log>.lock` while it runs and prunes the log itself (at start, daily, and on POST /admin/audit/prune), so a
prune from the command line beside a live gateway is refused instead of forking the chain. Truncating the newest
records is only detectable against an external copy of the head hash (`verify --expect-head`): the gateway logs
the head every `head_export_s` seconds and the rollout report records it.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

log = logging.getLogger(__name__)

GENESIS = "0" * 64
PRUNE_EVERY_S = 24 * 3600


class AuditTampered(RuntimeError):
    """The audit log does not verify; the message names the line and what is wrong."""


class AuditBusy(RuntimeError):
    """Another process (a running gateway) is the log's writer."""


def _digest(key: bytes, prev: str, record: dict) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "hash"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, (prev + body).encode(), hashlib.sha256).hexdigest()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def key_id(key: bytes) -> str:
    """Names the audit key in messages without revealing it."""
    return hashlib.sha256(b"ft2prod-audit-key-id" + key).hexdigest()[:16]


class AuditLog:
    """The log at `path`, chained with `key`. A `writer` (the gateway, or a prune from the command line) holds the
    exclusive writer lock for its lifetime; readers (verify, search) take none."""

    def __init__(self, path: str | Path, key: bytes, retention_days: int = 180, writer: bool = False,
                 head_export_s: float = 60.0) -> None:
        self.path, self.key = Path(path), key
        self.anchor_path = self.path.with_name(self.path.name + ".anchor.json")
        self.retention = timedelta(days=retention_days)
        self.head_export_s = head_export_s
        self._lock = threading.Lock()
        self._writer = None
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._writer)
                raise AuditBusy(f"{self.path} is being written by a running gateway; it prunes the log itself "
                                "(at start, daily, and on POST /admin/audit/prune)") from None
        last = None
        for last in self.records():
            pass
        self._seq, self._head = (last["seq"] + 1, last["hash"]) if last else self._start()
        self._exported, self._pruned = float("-inf"), time.monotonic()

    def close(self) -> None:
        """Give up the writer lock (the process ending does too)."""
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None

    def _start(self) -> tuple[int, str]:
        if self.anchor_path.exists():
            anchor = json.loads(self.anchor_path.read_text())
            return anchor["seq"], anchor["prev"]
        return 0, GENESIS

    @property
    def head(self) -> str:
        return self._head

    def records(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with open(self.path) as handle:
            for number, line in enumerate(handle, 1):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise AuditTampered(f"{self.path}:{number}: not a JSON record") from None

    def append(self, event: dict) -> dict:
        if self._writer is None:
            raise AuditBusy(f"{self.path}: opened for reading; only its writer appends")
        with self._lock:
            record = {"seq": self._seq, "time": event.pop("time", None) or now(), **event, "prev": self._head}
            record["hash"] = _digest(self.key, self._head, record)
            line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            self._seq, self._head = self._seq + 1, record["hash"]
        moment = time.monotonic()
        if moment - self._exported >= self.head_export_s:
            self._exported = moment
            # Shipped off the host with the gateway's log: what `verify --expect-head` checks a truncated log against.
            log.info("audit head: seq %d hash %s (key %s)", record["seq"], record["hash"], key_id(self.key))
        if moment - self._pruned >= PRUNE_EVERY_S:
            self._pruned = moment
            self.prune()
        return record

    def verify(self, expect_head: str | None = None) -> dict:
        """Walk the chain from the anchor (or genesis); raise AuditTampered at the first bad record."""
        seq, prev = self._start()
        anchor_prev = prev if self.anchor_path.exists() else None
        prune_anchor, count = None, 0
        for number, record in enumerate(self.records(), 1):
            where = f"{self.path}:{number}"
            if record.get("seq") != seq:
                raise AuditTampered(f"{where}: expected record {seq}, found {record.get('seq')} (a record was removed or reordered)")
            if record.get("prev") != prev:
                raise AuditTampered(f"{where}: does not follow the previous record (chain broken)")
            if _digest(self.key, prev, record) != record.get("hash"):
                raise AuditTampered(f"{where}: record content does not match its hash (edited, or chained with another "
                                    f"key than {key_id(self.key)})")
            if record.get("event") == "audit.prune":
                prune_anchor = record["anchor_prev"]
            seq, prev, count = seq + 1, record["hash"], count + 1
        if anchor_prev is not None and prune_anchor != anchor_prev:
            raise AuditTampered(f"{self.anchor_path}: anchor does not match the chained audit.prune event (anchor moved)")
        if expect_head and prev != expect_head:
            raise AuditTampered(f"{self.path}: head {prev[:16]}… is not the expected {expect_head[:16]}… (records truncated)")
        return {"records": count, "head": prev, "first_seq": seq - count}

    def prune(self, at: datetime | None = None) -> int:
        """Drop records older than the retention period; the kept chain stays verifiable. Only the writer prunes."""
        if self._writer is None:
            raise AuditBusy(f"{self.path}: opened for reading; only its writer prunes")
        cutoff = (at or datetime.now(UTC)) - self.retention
        with self._lock:
            records = list(self.records())
            kept = [r for r in records if datetime.fromisoformat(r["time"]) >= cutoff]
            dropped = len(records) - len(kept)
            if dropped == 0:
                return 0
            first = kept[0] if kept else {"seq": self._seq, "prev": self._head}
            partial = self.anchor_path.with_suffix(".partial")
            partial.write_text(json.dumps({"seq": first["seq"], "prev": first["prev"], "pruned_before": cutoff.isoformat()}))
            rewritten = self.path.with_suffix(".partial")
            rewritten.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in kept))
            os.chmod(rewritten, 0o600)
            partial.replace(self.anchor_path)
            rewritten.replace(self.path)
            anchor = first["prev"]
        self.append({"event": "audit.prune", "pruned": dropped, "anchor_prev": anchor, "cutoff": cutoff.isoformat()})
        return dropped

    def search(self, since: str | None = None, until: str | None = None, limit: int = 100, **equals) -> list[dict]:
        found = []
        for record in self.records():
            if since and record["time"] < since or until and record["time"] > until:
                continue
            if all(value is None or str(record.get(key)) == str(value) for key, value in equals.items()):
                found.append(record)
        return found[-limit:]


def alerts(records: list[dict], denied_burst: int, window_s: float) -> list[dict]:
    """Anomalies for auditors: requests from outside a role's allow-list, and bursts of denied requests
    (at least `denied_burst` 401/403 answers to one client address within `window_s` seconds)."""
    found = [
        {"kind": "outside_allow_list", "time": r["time"], "client_ip": r["client_ip"], "key_id": r.get("key_id"),
         "endpoint": r.get("endpoint")}
        for r in records if r.get("reason") == "ip_not_allowed"
    ]
    denied: dict[str, list[datetime]] = {}
    for record in records:
        if record.get("status") in (401, 403):
            denied.setdefault(record["client_ip"], []).append(datetime.fromisoformat(record["time"]))
    for ip, times in denied.items():
        start = 0
        for end, moment in enumerate(times):
            while (moment - times[start]).total_seconds() > window_s:
                start += 1
            if end - start + 1 >= denied_burst:
                found.append({"kind": "denied_burst", "time": moment.isoformat(), "client_ip": ip, "count": end - start + 1,
                              "window_s": window_s})
                break
    return found
