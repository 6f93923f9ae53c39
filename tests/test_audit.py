"""The audit log's chain, its tamper detection, retention pruning, alerts; client addresses behind proxies."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from workflow.config import Gateway
from workflow.serve.access import Denied, KeyStore, Policy, client_ip, networks
from workflow.serve.audit import GENESIS, AuditBusy, AuditLog, AuditTampered, alerts

KEY = bytes(range(32))


def days_ago(n: float) -> str:
    return (datetime.now(UTC) - timedelta(days=n)).isoformat()


@pytest.fixture
def log(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", KEY, retention_days=180, writer=True)
    for i, age in enumerate([400, 300, 200, 100, 10, 1]):
        audit.append({"event": "request", "time": days_ago(age), "status": 200, "client_ip": "10.0.0.1", "n": i})
    yield audit
    audit.close()


def rewrite(path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def test_chain_verifies_and_survives_reopening(log):
    head = log.verify()["head"]
    log.close()
    reopened = AuditLog(log.path, KEY, writer=True)
    assert reopened.head == head
    reopened.append({"event": "request", "status": 200, "client_ip": "10.0.0.1"})
    assert reopened.verify()["records"] == 7


@pytest.mark.parametrize("tamper, message", [
    (lambda lines: [lines[0], lines[1].replace('"status":200', '"status":201'), *lines[2:]], "edited"),
    (lambda lines: [lines[0], *lines[2:]], "removed or reordered"),
    (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], "removed or reordered"),
    (lambda lines: lines[1:], "removed or reordered"),
])
def test_edited_deleted_or_reordered_records_are_detected(log, tamper, message):
    rewrite(log.path, tamper)
    with pytest.raises(AuditTampered, match=message):
        AuditLog(log.path, KEY).verify()


def test_truncated_tail_is_detected_against_the_recorded_head(log):
    head = log.verify()["head"]
    rewrite(log.path, lambda lines: lines[:-1])
    assert AuditLog(log.path, KEY).verify()["records"] == 5  # the chain alone cannot tell
    with pytest.raises(AuditTampered, match="truncated"):
        AuditLog(log.path, KEY).verify(expect_head=head)


def test_retention_pruning_keeps_the_rest_verifiable(log):
    assert log.prune() == 3  # 400, 300 and 200 days old
    result = log.verify()
    assert result["records"] == 4 and result["first_seq"] == 3  # 3 kept + the chained audit.prune event
    records = list(log.records())
    assert records[-1]["event"] == "audit.prune" and records[-1]["pruned"] == 3
    log.append({"event": "request", "status": 200, "client_ip": "10.0.0.1"})
    assert AuditLog(log.path, KEY).verify()["records"] == 5


def test_pruning_cannot_be_faked_by_cutting_the_head_and_moving_the_anchor(log):
    log.prune()
    rewrite(log.path, lambda lines: lines[1:])  # drop the oldest kept record too
    anchor = json.loads(log.anchor_path.read_text())
    first = json.loads(log.path.read_text().splitlines()[0])
    log.anchor_path.write_text(json.dumps(anchor | {"seq": first["seq"], "prev": first["prev"]}))
    with pytest.raises(AuditTampered, match="anchor moved"):
        AuditLog(log.path, KEY).verify()


def cli(log: AuditLog, folder) -> list[str]:
    """`python -m workflow.serve audit` on this log, with its key in a file of its own, as an operator runs it."""
    (folder / "audit.key").write_bytes(KEY)
    (folder / "audit.key").chmod(0o600)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({"rollout": {"gateway": {"audit": {"path": str(log.path), "key_file": str(folder / "audit.key")}}}}))
    return [sys.executable, "-m", "workflow.serve", "--config", str(config), "audit"]


def test_cli_verify_fails_with_the_line_of_a_tampered_record(log, tmp_path):
    audit = cli(log, tmp_path)
    ok = subprocess.run([*audit, "verify"], capture_output=True, text=True)
    assert ok.returncode == 0 and "6 records" in ok.stdout
    rewrite(log.path, lambda lines: [*lines[:3], lines[3].replace("10.0.0.1", "10.0.0.2"), *lines[4:]])
    bad = subprocess.run([*audit, "verify"], capture_output=True, text=True)
    assert bad.returncode == 2 and "audit.jsonl:4: record content does not match its hash" in bad.stderr


def test_an_edit_with_the_chain_recomputed_is_detected_without_the_key(log):
    """Whoever can write the log but not read the key edits a record and recomputes every hash, as one could with a
    plain SHA-256 chain: the keyed chain still fails at the edited record."""
    records = list(log.records())
    records[3]["status"] = 403
    prev = records[0]["prev"]
    for record in records:
        body = json.dumps({k: v for k, v in record.items() if k != "hash"} | {"prev": prev}, sort_keys=True, separators=(",", ":"))
        record["prev"], record["hash"] = prev, hashlib.sha256((prev + body).encode()).hexdigest()
        prev = record["hash"]
    log.path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records))
    with pytest.raises(AuditTampered, match=r"audit.jsonl:1: record content does not match its hash \(edited, or chained with another key"):
        AuditLog(log.path, KEY).verify()


def test_a_log_verified_with_another_key_fails(log):
    with pytest.raises(AuditTampered, match="another key"):
        AuditLog(log.path, bytes(32)).verify()


def test_a_prune_beside_the_live_writer_is_refused_and_the_chain_never_forks(log, tmp_path):
    """`audit prune` from the command line while a gateway writes: before, both wrote the same sequence number."""
    audit = cli(log, tmp_path)
    refused = subprocess.run([*audit, "prune"], capture_output=True, text=True)
    assert refused.returncode == 2 and "being written by a running gateway" in refused.stderr
    with pytest.raises(AuditBusy):
        AuditLog(log.path, KEY, writer=True)
    assert log.prune() == 3  # the writer prunes under its own lock, between appends
    log.append({"event": "request", "status": 200, "client_ip": "10.0.0.1"})
    seqs = [r["seq"] for r in log.records()]
    assert seqs == sorted(set(seqs)) and AuditLog(log.path, KEY).verify()["records"] == 5
    log.close()
    pruned_offline = subprocess.run([*audit, "prune"],
                                    capture_output=True, text=True)
    assert pruned_offline.returncode == 0, pruned_offline.stderr  # with the gateway stopped, the command may prune


def test_the_writer_exports_its_head_and_only_the_writer_appends(tmp_path, caplog):
    writer = AuditLog(tmp_path / "a.jsonl", KEY, writer=True, head_export_s=3600)
    with caplog.at_level("INFO", logger="workflow.serve.audit"):
        first = writer.append({"event": "request"})
        writer.append({"event": "request"})
    exported = [r.getMessage() for r in caplog.records if "audit head" in r.getMessage()]
    assert exported == [f"audit head: seq 0 hash {first['hash']} (key {hashlib.sha256(b'ft2prod-audit-key-id' + KEY).hexdigest()[:16]})"]
    assert first["prev"] == GENESIS
    with pytest.raises(AuditBusy):
        AuditLog(tmp_path / "a.jsonl", KEY).append({"event": "request"})
    writer.close()


def test_alerts_find_denied_bursts_and_requests_from_outside_the_allow_list():
    now = datetime.now(UTC)
    records = [{"time": (now + timedelta(seconds=i)).isoformat(), "status": 401, "client_ip": "10.9.9.9"} for i in range(5)]
    records += [{"time": (now + timedelta(seconds=10 * i)).isoformat(), "status": 401, "client_ip": "10.8.8.8"} for i in range(5)]
    records += [{"time": now.isoformat(), "status": 403, "reason": "ip_not_allowed", "client_ip": "203.0.113.9"}]
    found = alerts(records, denied_burst=5, window_s=30)
    assert [(a["kind"], a["client_ip"]) for a in found] == [("outside_allow_list", "203.0.113.9"), ("denied_burst", "10.9.9.9")]


def test_client_address_comes_from_forwarded_for_only_behind_a_trusted_proxy():
    proxies = networks(["10.0.0.0/30"], "trusted_proxies")
    assert client_ip("10.0.0.1", "198.51.100.7", proxies) == "198.51.100.7"
    assert client_ip("10.0.0.1", "6.6.6.6, 198.51.100.7, 10.0.0.2", proxies) == "198.51.100.7"  # left of it is forgeable
    assert client_ip("192.0.2.5", "198.51.100.7", proxies) == "192.0.2.5"  # not a trusted proxy: its header is ignored
    with pytest.raises(Denied, match="malformed"):
        client_ip("10.0.0.1", "not-an-ip", proxies)


def test_keys_are_stored_only_as_hashes_and_roles_checked(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    key = store.add("alice", "analyst")
    assert key not in (tmp_path / "keys.json").read_text() and oct((tmp_path / "keys.json").stat().st_mode)[-3:] == "600"
    assert KeyStore(tmp_path / "keys.json").identify(f"Bearer {key}").role == "analyst"
    with pytest.raises(ValueError, match="role must be one of admin, analyst, auditor"):
        store.add("bob", "root")
    with pytest.raises(Denied, match="unknown API key"):
        store.identify("Bearer ftk-guess")
    store.revoke("alice")
    with pytest.raises(Denied):
        KeyStore(tmp_path / "keys.json").identify(f"Bearer {key}")
    with pytest.raises(ValueError, match="rollout.gateway.allow.analyst"):
        Policy.from_config(Gateway(allow={"analyst": ["10.0.0.300/8"]}))
