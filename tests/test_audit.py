"""The audit log's chain, its tamper detection, retention pruning, alerts; client addresses behind proxies."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from workflow.serve.access import Denied, KeyStore, Policy, client_ip, networks
from workflow.serve.audit import AuditLog, AuditTampered, alerts


def days_ago(n: float) -> str:
    return (datetime.now(UTC) - timedelta(days=n)).isoformat()


@pytest.fixture
def log(tmp_path) -> AuditLog:
    audit = AuditLog(tmp_path / "audit.jsonl", retention_days=180)
    for i, age in enumerate([400, 300, 200, 100, 10, 1]):
        audit.append({"event": "request", "time": days_ago(age), "status": 200, "client_ip": "10.0.0.1", "n": i})
    return audit


def rewrite(path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def test_chain_verifies_and_survives_reopening(log):
    head = log.verify()["head"]
    reopened = AuditLog(log.path)
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
        AuditLog(log.path).verify()


def test_truncated_tail_is_detected_against_the_recorded_head(log):
    head = log.verify()["head"]
    rewrite(log.path, lambda lines: lines[:-1])
    assert AuditLog(log.path).verify()["records"] == 5  # the chain alone cannot tell
    with pytest.raises(AuditTampered, match="truncated"):
        AuditLog(log.path).verify(expect_head=head)


def test_retention_pruning_keeps_the_rest_verifiable(log):
    assert log.prune() == 3  # 400, 300 and 200 days old
    result = log.verify()
    assert result["records"] == 4 and result["first_seq"] == 3  # 3 kept + the chained audit.prune event
    records = list(log.records())
    assert records[-1]["event"] == "audit.prune" and records[-1]["pruned"] == 3
    log.append({"event": "request", "status": 200, "client_ip": "10.0.0.1"})
    assert AuditLog(log.path).verify()["records"] == 5


def test_pruning_cannot_be_faked_by_cutting_the_head_and_moving_the_anchor(log):
    log.prune()
    rewrite(log.path, lambda lines: lines[1:])  # drop the oldest kept record too
    anchor = json.loads(log.anchor_path.read_text())
    first = json.loads(log.path.read_text().splitlines()[0])
    log.anchor_path.write_text(json.dumps(anchor | {"seq": first["seq"], "prev": first["prev"]}))
    with pytest.raises(AuditTampered, match="anchor moved"):
        AuditLog(log.path).verify()


def test_cli_verify_fails_with_the_line_of_a_tampered_record(log, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"rollout": {"gateway": {"audit": {"path": str(log.path)}}}}))
    ok = subprocess.run([sys.executable, "-m", "workflow.serve", "--config", str(config), "audit", "verify"], capture_output=True, text=True)
    assert ok.returncode == 0 and "6 records" in ok.stdout
    rewrite(log.path, lambda lines: [*lines[:3], lines[3].replace("10.0.0.1", "10.0.0.2"), *lines[4:]])
    bad = subprocess.run([sys.executable, "-m", "workflow.serve", "--config", str(config), "audit", "verify"], capture_output=True, text=True)
    assert bad.returncode == 2 and "audit.jsonl:4: record content does not match its hash" in bad.stderr


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
        Policy.from_config({"allow": {"analyst": ["10.0.0.300/8"]}, "trusted_proxies": []})
