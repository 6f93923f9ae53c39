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

The audit volume may be writable by others: its files are opened only through auditfolder.py (no links followed,
no foreign files used). A prune verifies the whole chain first and drops nothing from a log that does not verify;
`verify` checks the prune events against the anchor. An append is written whole or not at all (AuditWriteFailed:
the gateway then answers 503); a torn last line is cut off at the writer's next start and recorded as a chained
`audit.recovered` event. A flood of refusals can be written as one `refused.aggregate` record (record_refusals).
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

from workflow.serve.auditfolder import AuditFolder, write_all

log = logging.getLogger(__name__)

GENESIS = "0" * 64
PRUNE_EVERY_S = 24 * 3600


class AuditTampered(RuntimeError):
    """The audit log does not verify; the message names the line and what is wrong."""


class AuditBusy(RuntimeError):
    """Another process (a running gateway) is the log's writer."""


class AuditWriteFailed(OSError):
    """A record could not be written whole (volume full, I/O error); nothing of it is left in the log."""


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
    exclusive writer lock for its lifetime, refuses to start on a link or a foreign file where its files are, recovers
    a torn last line as a chained event and verifies the whole chain before it appends; readers (verify, search) take
    no lock."""

    def __init__(self, path: str | Path, key: bytes, retention_days: int = 180, writer: bool = False,
                 head_export_s: float = 60.0) -> None:
        self.path, self.key = Path(path), key
        self.name, self.anchor_name = self.path.name, self.path.name + ".anchor.json"
        self.anchor_path = self.path.with_name(self.anchor_name)
        self.retention = timedelta(days=retention_days)
        self.head_export_s = head_export_s
        self.folder = AuditFolder(self.path.parent, create=writer)
        self._lock = threading.Lock()
        self._writer = None
        self._unwritten: dict | None = None
        """Records that could not be written since the last one that was: {"count", "first", "last", "error"}."""
        self.carry = None
        """A callable giving the state each prune carries into its chained event (deployments.py sets it)."""
        self.failures: list[dict] = []
        """Alerts for auditors: appends that failed (volume full, I/O error), newest last."""
        if writer:
            self._take_writer_lock()
            torn = self._cut_torn_tail()
        self._exported, self._pruned = float("-inf"), time.monotonic()
        self._seq, self._head = self._start()
        if writer:
            checked = self.verify()
            self._seq, self._head = checked["first_seq"] + checked["records"], checked["head"]
            if torn:
                self.append({"event": "audit.recovered", "torn_bytes": len(torn),
                             "torn_sha256": hashlib.sha256(torn).hexdigest(), "torn_text": torn[:512].decode("utf-8", "replace")})

    def _take_writer_lock(self) -> None:
        self.folder.check(self.name, self.anchor_name, self.name + ".lock")
        self._writer = self.folder.appender(self.name + ".lock")
        try:
            fcntl.flock(self._writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._writer)
            self._writer = None
            raise AuditBusy(f"{self.path} is being written by a running gateway; it prunes the log itself "
                            "(at start, daily, and on POST /admin/audit/prune)") from None

    def _cut_torn_tail(self) -> bytes:
        """A last line without its newline (a write cut short: a full volume, a crash) is cut off and returned, to be
        recorded as a chained `audit.recovered` event; the complete records before it are kept as they are."""
        fd = self.folder.appender(self.name)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return b""
            tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
            if tail.endswith(b"\n"):
                return b""
            cut = tail.rfind(b"\n") + 1
            keep = size - len(tail) + cut
            os.ftruncate(fd, keep)
            log.error("audit: %s ended in a torn line of %d bytes (a write cut short); cut off and recorded as an "
                      "audit.recovered event", self.path, len(tail) - cut)
            return tail[cut:]
        finally:
            os.close(fd)

    def close(self) -> None:
        """Give up the writer lock (the process ending does too)."""
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None
        self.folder.close()

    def _anchor(self) -> dict | None:
        data = self.folder.read(self.anchor_name)
        return json.loads(data) if data is not None else None

    def _start(self) -> tuple[int, str]:
        anchor = self._anchor()
        return (anchor["seq"], anchor["prev"]) if anchor else (0, GENESIS)

    @property
    def head(self) -> str:
        return self._head

    def records(self, torn_ok: bool = False) -> Iterator[dict]:
        """Every record in order; a torn last line is an error, or skipped with `torn_ok` (another live writer's log)."""
        handle = self.folder.reader(self.name)
        if handle is None:
            return
        with handle:
            for number, line in enumerate(handle, 1):
                if not line.endswith(b"\n"):
                    if torn_ok:
                        return
                    raise AuditTampered(f"{self.path}:{number}: a torn last line (a write cut short); the gateway cuts it "
                                        "off and records it as an audit.recovered event at its next start")
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise AuditTampered(f"{self.path}:{number}: not a JSON record") from None

    def _line(self, event: dict) -> tuple[dict, bytes]:
        record = {"seq": self._seq, "time": event.pop("time", None) or now(), **event, "prev": self._head}
        record["hash"] = _digest(self.key, self._head, record)
        return record, (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()

    def _write(self, event: dict) -> dict:
        """Append one record, all of it or nothing (a failed write is cut back off); AuditWriteFailed when not."""
        record, line = self._line(event)
        fd = self.folder.appender(self.name)
        try:
            start = os.fstat(fd).st_size
            try:
                write_all(fd, line)
            except OSError as err:
                os.ftruncate(fd, start)
                raise AuditWriteFailed(f"audit: record {record['seq']} not written to {self.path}: {err.strerror or err}") from err
        finally:
            os.close(fd)
        self._seq, self._head = self._seq + 1, record["hash"]
        return record

    def append(self, event: dict) -> dict:
        """Chain and write `event`; raise AuditWriteFailed (an alert is kept) when it could not be written whole:
        the caller must not complete the answer it records (the gateway answers 503 instead)."""
        if self._writer is None:
            raise AuditBusy(f"{self.path}: opened for reading; only its writer appends")
        with self._lock:
            try:
                if self._unwritten:  # what could not be written before, itself a chained record now
                    self._write({"event": "audit.unwritten", **self._unwritten})
                    self._unwritten = None
                record = self._write(event)
            except AuditWriteFailed as err:
                moment = now()
                missed = self._unwritten or {"count": 0, "first": moment}
                self._unwritten = missed | {"count": missed["count"] + 1, "last": moment, "error": str(err)}
                self.failures = (self.failures + [{"kind": "audit_write_failed", "time": moment, "error": str(err)}])[-100:]
                log.error("ALERT %s", err)
                raise
        moment = time.monotonic()
        if moment - self._exported >= self.head_export_s:
            self._exported = moment
            # Shipped off the host with the gateway's log: what `verify --expect-head` checks a truncated log against.
            log.info("audit head: seq %d hash %s (key %s)", record["seq"], record["hash"], key_id(self.key))
        if moment - self._pruned >= PRUNE_EVERY_S:
            self._pruned = moment
            try:
                self.prune()
            except AuditTampered as err:
                log.error("ALERT audit: not pruned, the log does not verify: %s", err)
        return record

    def record_refusals(self, client_ip: str, status: int, reason: str, count: int, first: str, last: str,
                        detail: dict | None = None) -> dict:
        """One chained record for `count` refused requests alike (same address, status and reason) between the
        times `first` and `last` (ISO 8601): what a flood of refusals is written as, instead of one record each.
        Alerts count it as `count` refusals."""
        if count < 1:
            raise ValueError(f"record_refusals: count must be at least 1 (got {count})")
        event = {"event": "refused.aggregate", "client_ip": client_ip, "status": status, "reason": reason,
                 "count": count, "first": first, "last": last, "time": last}
        if detail:
            event["detail"] = detail
        return self.append(event)

    def verify(self, expect_head: str | None = None, torn_ok: bool = False) -> dict:
        """Walk the chain from the anchor (or genesis); raise AuditTampered at the first bad record, or when the
        anchor and the prune events do not agree."""
        seq, prev = self._start()
        anchor = self._anchor()
        prunes, count = [], 0
        for number, record in enumerate(self.records(torn_ok), 1):
            where = f"{self.path}:{number}"
            if record.get("seq") != seq:
                raise AuditTampered(f"{where}: expected record {seq}, found {record.get('seq')} (a record was removed or reordered)")
            if record.get("prev") != prev:
                raise AuditTampered(f"{where}: does not follow the previous record (chain broken)")
            if _digest(self.key, prev, record) != record.get("hash"):
                raise AuditTampered(f"{where}: record content does not match its hash (edited, or chained with another "
                                    f"key than {key_id(self.key)})")
            if record.get("event") == "audit.prune":
                prunes.append((where, record))
            seq, prev, count = seq + 1, record["hash"], count + 1
        check_prunes(self.anchor_path, anchor, prunes)
        if expect_head and prev != expect_head:
            raise AuditTampered(f"{self.path}: head {prev[:16]}… is not the expected {expect_head[:16]}… (records truncated)")
        return {"records": count, "head": prev, "first_seq": seq - count}

    def prune(self, at: datetime | None = None) -> int:
        """Drop the records older than the retention period, after verifying the whole chain up to this writer's own
        head (an edited, removed or truncated record stops the prune: nothing is dropped). The kept chain stays
        verifiable; `self.carry()` (the anti-rollback state) is written into the chained prune event. Only the writer prunes."""
        if self._writer is None:
            raise AuditBusy(f"{self.path}: opened for reading; only its writer prunes")
        cutoff = (at or datetime.now(UTC)) - self.retention
        with self._lock:
            first_seq = self.verify(expect_head=self._head)["first_seq"]
            records = list(self.records())
            dropped = next((i for i, r in enumerate(records) if datetime.fromisoformat(r["time"]) >= cutoff), len(records))
            if dropped == 0:
                return 0
            first = records[dropped] if dropped < len(records) else {"seq": self._seq, "prev": self._head}
            self.folder.replace(self.anchor_name, json.dumps(
                {"seq": first["seq"], "prev": first["prev"], "pruned_before": cutoff.isoformat()}).encode())
            self.folder.replace(self.name, b"".join(
                (json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n").encode() for r in records[dropped:]))
        self.append({"event": "audit.prune", "pruned": dropped, "from_seq": first_seq, "anchor_seq": first["seq"],
                     "anchor_prev": first["prev"], "cutoff": cutoff.isoformat(), **({"carry": self.carry()} if self.carry else {})})
        return dropped

    def search(self, since: str | None = None, until: str | None = None, limit: int = 100, **equals) -> list[dict]:
        found = []
        for record in self.records(torn_ok=True):
            if since and record["time"] < since or until and record["time"] > until:
                continue
            if all(value is None or str(record.get(key)) == str(value) for key, value in equals.items()):
                found.append(record)
        return found[-limit:]


def check_prunes(anchor_path: Path, anchor: dict | None, prunes: list[tuple[str, dict]]) -> None:
    """The anchor is where the newest prune event says the log starts, each prune dropped exactly the records
    between where the previous one left the log and its own anchor, and no anchor is there without a prune event."""
    if anchor is not None and not prunes:
        raise AuditTampered(f"{anchor_path}: an anchor but no chained audit.prune event (anchor planted or log cut)")
    previous = None
    for where, prune in prunes:
        anchor_seq, from_seq = prune.get("anchor_seq"), prune.get("from_seq")
        if anchor_seq is None or from_seq is None:
            continue  # written before prune events carried their seqs: only the anchor check below holds them
        if prune.get("pruned") != anchor_seq - from_seq:
            raise AuditTampered(f"{where}: a prune event that dropped {prune.get('pruned')} records between #{from_seq} "
                                f"and #{anchor_seq}: it does not add up")
        if previous is not None and from_seq != previous:
            raise AuditTampered(f"{where}: a prune from #{from_seq}, but the previous prune left the log at #{previous}")
        previous = anchor_seq
    if prunes and (anchor or {}).get("prev") != prunes[-1][1].get("anchor_prev"):
        raise AuditTampered(f"{anchor_path}: anchor does not match the chained audit.prune event (anchor moved)")


def alerts(records: list[dict], denied_burst: int, window_s: float) -> list[dict]:
    """Anomalies for auditors: requests from outside a role's allow-list, and bursts of denied requests
    (at least `denied_burst` 401/403 answers to one client address within `window_s` seconds; an aggregated
    `refused.aggregate` record counts as its `count` refusals)."""
    found = [
        {"kind": "outside_allow_list", "time": r["time"], "client_ip": r["client_ip"], "key_id": r.get("key_id"),
         "endpoint": r.get("endpoint")}
        for r in records if r.get("reason") == "ip_not_allowed"
    ]
    denied: dict[str, list[tuple[datetime, int]]] = {}
    for record in records:
        if record.get("status") in (401, 403):
            weight = record.get("count", 1) if record.get("event") == "refused.aggregate" else 1
            denied.setdefault(record["client_ip"], []).append((datetime.fromisoformat(record["time"]), weight))
    for ip, times in denied.items():
        start, total = 0, 0
        for moment, weight in times:
            total += weight
            while (moment - times[start][0]).total_seconds() > window_s:
                total -= times[start][1]
                start += 1
            if total >= denied_burst:
                found.append({"kind": "denied_burst", "time": moment.isoformat(), "client_ip": ip, "count": total,
                              "window_s": window_s})
                break
    return found
