"""Attacks on the audit volume, the audit chain, the anti-rollback floor and the API-key file (issue 22, findings 1, 2,
4, 6, 7), each performed for real: links planted where the gateway writes, times edited without the key, a volume
that fills up (RLIMIT_FSIZE: the kernel refuses the write, as on a full disk), a torn line, a restart on an older
package, a replica's floor, a key file loosened while the gateway runs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import signed_package
import yaml

from workflow.package import archive
from workflow.package.kms import LocalKeyFile
from workflow.serve.access import Denied, KeyStore
from workflow.serve.audit import AuditLog, AuditTampered, AuditWriteFailed
from workflow.serve.auditfolder import UnsafeAuditFile
from workflow.serve.deployments import Deployments
from workflow.serve.protocol import BadRequest
from workflow.wait import wait_for

KEY = bytes(range(32))
SECRET = b"K" * 32  # stands for keys/kek.bin: a file the gateway may write, which the attacker wants destroyed


def days_ago(n: float) -> str:
    return (datetime.now(UTC) - timedelta(days=n)).isoformat()


@pytest.fixture
def volume(tmp_path):
    """An audit folder with a log of six records (three past retention) and a victim file outside it."""
    (tmp_path / "keys").mkdir()
    victim = tmp_path / "keys" / "kek.bin"
    victim.write_bytes(SECRET)
    audit = AuditLog(tmp_path / "audit" / "gateway.jsonl", KEY, retention_days=180, writer=True)
    for age in (400, 300, 200, 100, 10, 1):
        audit.append({"event": "request", "time": days_ago(age), "status": 401, "client_ip": "10.0.0.9"})
    yield audit, victim
    audit.close()


def test_links_planted_where_the_prune_writes_are_not_followed(volume):
    """Finding 1: links at the temporary names a prune used (fixed names, before) and at the anchor; the prune needs no
    key to trigger. Before: the gateway truncated and overwrote the link's target."""
    audit, victim = volume
    folder = audit.path.parent
    for name in ("gateway.partial", "gateway.jsonl.anchor.partial", "gateway.jsonl.partial"):
        (folder / name).symlink_to(victim)
    os.chmod(victim, 0o640)
    (folder / "gateway.jsonl.anchor.json").symlink_to(victim)
    with pytest.raises(UnsafeAuditFile, match="anchor.json: a symbolic link"):
        audit.prune()  # a link where the anchor is read: refused, not read or written through
    (folder / "gateway.jsonl.anchor.json").unlink()
    assert audit.prune() == 3
    assert victim.read_bytes() == SECRET and oct(victim.stat().st_mode)[-3:] == "640", "the target was written or chmodded"
    assert AuditLog(audit.path, KEY).verify()["records"] == 4


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "foreign"])
def test_a_log_replaced_by_a_link_or_a_foreign_file_is_refused_at_start(volume, plant):
    """Finding 1: the log itself swapped for a link to the KEK (or a hard link, or a file of another user): the
    gateway refuses to start instead of appending to it."""
    audit, victim = volume
    audit.close()
    audit.path.unlink()
    if plant == "symlink":
        audit.path.symlink_to(victim)
    elif plant == "hardlink":
        os.link(victim, audit.path)
    else:
        audit.path.write_bytes(b"")
        os.chown(audit.path, 12345, 12345)
    with pytest.raises(UnsafeAuditFile, match="refusing"):
        AuditLog(audit.path, KEY, writer=True)
    assert victim.read_bytes() == SECRET


def test_a_link_swapped_in_for_the_log_while_the_gateway_runs_is_not_written(volume):
    audit, victim = volume
    audit.path.unlink()
    audit.path.symlink_to(victim)
    with pytest.raises(UnsafeAuditFile):
        audit.append({"event": "request", "status": 200})
    assert victim.read_bytes() == SECRET


def test_an_edited_time_does_not_launder_a_record_out_of_the_log(volume):
    """Finding 2: whoever can write the volume gives a recent refused request an old time; the prune used to drop it by
    that time, unchecked, and verify then passed. Now the prune verifies first and drops nothing."""
    audit, _ = volume
    lines = audit.path.read_text().splitlines()
    edited = json.loads(lines[4]) | {"time": days_ago(500)}
    lines[4] = json.dumps(edited, sort_keys=True, separators=(",", ":"))
    audit.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditTampered, match="gateway.jsonl:5: record content does not match its hash"):
        audit.prune()
    assert audit.path.read_text().splitlines() == lines, "nothing dropped"
    with pytest.raises(AuditTampered, match=":5:"):
        AuditLog(audit.path, KEY).verify()


def test_the_prune_events_are_checked_against_the_anchor(volume):
    audit, _ = volume
    audit.prune()
    prune = json.loads(audit.path.read_text().splitlines()[-1])
    assert (prune["from_seq"], prune["anchor_seq"], prune["pruned"]) == (0, 3, 3)
    audit.anchor_path.unlink()
    audit.close()
    with pytest.raises(AuditTampered, match="expected record 0"):
        AuditLog(audit.path, KEY).verify()


FILL = textwrap.dedent("""
    import resource, sys
    from workflow.serve.audit import AuditLog, AuditWriteFailed
    log = AuditLog(sys.argv[1], bytes(range(32)), writer=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
    failed = 0
    for i in range(50):
        try:
            log.append({"event": "request", "status": 200, "client_ip": "10.0.0.1", "n": i})
        except AuditWriteFailed as err:
            failed += 1
            print("FAILED", err)
    print("failed", failed)
""")


def test_a_full_volume_writes_no_torn_record_and_the_gap_is_chained_after(tmp_path):
    """Finding 4: the kernel refuses the write past the file-size limit (EFBIG, as ENOSPC on a full disk), part-way
    through a record. Before: the write was taken for whole, the log kept half a line and the gateway could not start
    again ("not a JSON record"). Now: the caller is told, nothing torn is left, and the gap is a chained record."""
    path = tmp_path / "audit" / "gateway.jsonl"
    done = subprocess.run([sys.executable, "-c", FILL, str(path), "3000"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    assert "FAILED audit: record" in done.stdout and "File too large" in done.stdout
    assert path.read_bytes().endswith(b"\n") and path.stat().st_size <= 3000
    audit = AuditLog(path, KEY, writer=True)  # starts again
    kept = audit.verify()["records"]
    audit.append({"event": "request", "status": 200, "client_ip": "10.0.0.1"})
    records = list(audit.records())
    assert records[kept - 1]["event"] == "request" and AuditLog(path, KEY).verify()["records"] == kept + 1
    audit.close()


def test_the_writer_tells_what_it_could_not_write_as_a_chained_record(tmp_path):
    audit = AuditLog(tmp_path / "gateway.jsonl", KEY, writer=True)
    audit.append({"event": "request", "status": 200})
    size = audit.path.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, hard))
    try:
        with pytest.raises(AuditWriteFailed):
            audit.append({"event": "request", "status": 200})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert audit.path.stat().st_size == size and audit.failures[-1]["kind"] == "audit_write_failed"
    audit.append({"event": "request", "status": 201})
    events = [r["event"] for r in audit.records()]
    assert events == ["request", "audit.unwritten", "request"] and list(audit.records())[1]["count"] == 1
    assert audit.verify()["records"] == 3
    audit.close()


def test_a_torn_last_line_is_recovered_as_a_chained_event(volume):
    """Finding 4: half a record at the end (a crash or a full disk mid-write). Before: the gateway refused to start."""
    audit, _ = volume
    audit.close()
    with open(audit.path, "ab") as handle:
        handle.write(b'{"seq":6,"time":"2026-')
    restarted = AuditLog(audit.path, KEY, writer=True)
    last = list(restarted.records())[-1]
    assert last["event"] == "audit.recovered" and last["torn_bytes"] == 22 and last["torn_text"] == '{"seq":6,"time":"2026-'
    assert restarted.verify()["records"] == 7
    restarted.close()


def test_aggregated_refusals_are_one_chained_record_that_alerts_count(tmp_path):
    from workflow.serve.audit import alerts

    audit = AuditLog(tmp_path / "gateway.jsonl", KEY, writer=True)
    first, last = days_ago(0.001), days_ago(0)
    record = audit.record_refusals("198.51.100.7", 401, "unknown_key", 1000, first, last, {"endpoint": "/v1/models"})
    assert record["count"] == 1000 and audit.verify()["records"] == 1
    assert alerts(list(audit.records()), denied_burst=5, window_s=60)[0]["count"] == 1000
    with pytest.raises(ValueError, match="count must be at least 1"):
        audit.record_refusals("198.51.100.7", 401, "unknown_key", 0, first, last)
    audit.close()




def created(package: Path, keys: Path) -> str:
    return archive.signed_manifest(package, archive.load_signing_key(keys / "signing.pem").public_key())[1]["created"]


def floor_at(audit_path: Path, package: Path, keys: Path) -> None:
    """A gateway served `package`: its chained record in the audit log at `audit_path`."""
    audit = AuditLog(audit_path, KEY, writer=True)
    Deployments(audit).record(archive.digest(package), created(package, keys))
    audit.close()


def test_a_restart_on_an_older_package_is_refused_even_with_the_deployments_record_gone(tmp_path):
    """Finding 6: before, `start --package` of an older signed package served it, and deleting the deployments record
    reset the floor. The floor is now rebuilt from the verified chain and checked before the gateway starts."""
    keys = tmp_path / "keys"
    older = signed_package(tmp_path / "older.ftpkg", keys)
    newer = signed_package(tmp_path / "newer.ftpkg", keys)
    audit_path = tmp_path / "audit" / "gateway.jsonl"
    floor_at(audit_path, newer, keys)
    (tmp_path / "audit" / "gateway.deployments.json").unlink(missing_ok=True)  # what used to hold the floor
    started = start_gateway(tmp_path, keys, audit_path, "--package", str(older))
    assert started.returncode == 2, started.stderr[-2000:]
    assert "refusing to start" in started.stderr and "older package" in started.stderr


def start_gateway(tmp_path: Path, keys: Path, audit_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m workflow.serve start *args` with the audit log at audit_path, for a start that is refused."""
    (keys / "audit.key").write_bytes(KEY)
    (keys / "audit.key").chmod(0o400)
    config = {"package": {"model_name": "m", "signing_key": str(keys / "signing.pem"),
                          "kms": {"local": {"key_file": str(keys / "kek.bin")}}},
              "rollout": {"gateway": {"port": 0, "api_keys": str(keys / "api_keys.json"), "tls": {"dir": str(tmp_path / "tls")},
                                      "audit": {"path": str(audit_path), "key_file": str(keys / "audit.key")}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "workflow.serve", "--config", str(tmp_path / "config.yaml"), "start", *args],
                          capture_output=True, text=True, timeout=120)


def test_a_pod_started_on_an_older_opened_package_is_refused(tmp_path, shm):
    """Finding 6 in Kubernetes: a pod's gateway starts on the folder its init container opened (`--model-dir`), and
    that start checked no floor, so pointing the Deployment at an older signed package served it. The opened folder
    now carries the package's digest and signed time (archive.OPENED_FROM), checked against the floor of every replica
    sharing the audit folder; a folder without that record is refused too."""
    keys = tmp_path / "keys"
    older = signed_package(tmp_path / "older.ftpkg", keys)
    newer = signed_package(tmp_path / "newer.ftpkg", keys)
    floor_at(tmp_path / "audit" / "pod-a.jsonl", newer, keys)
    opened = archive.open_package(older, archive.load_signing_key(keys / "signing.pem").public_key(),
                                  LocalKeyFile(keys / "kek.bin"), into=shm / "model")
    started = start_gateway(tmp_path, keys, tmp_path / "audit" / "pod-b.jsonl", "--model-dir", str(opened))
    assert started.returncode == 2, started.stderr[-2000:]
    assert "refusing to start" in started.stderr and "older package" in started.stderr

    (opened / archive.OPENED_FROM).unlink()  # copied in by hand, or opened by an older release
    started = start_gateway(tmp_path, keys, tmp_path / "audit" / "pod-b.jsonl", "--model-dir", str(opened))
    assert started.returncode == 2 and "holds no record of the package it was opened from" in started.stderr


def test_replicas_sharing_the_audit_folder_share_one_floor(tmp_path):
    """Finding 6: each replica kept its own floor. A replica that never served the newer package refuses the older one."""
    keys = tmp_path / "keys"
    older = signed_package(tmp_path / "older.ftpkg", keys)
    newer = signed_package(tmp_path / "newer.ftpkg", keys)
    floor_at(tmp_path / "audit" / "pod-a.jsonl", newer, keys)
    replica = AuditLog(tmp_path / "audit" / "pod-b.jsonl", KEY, writer=True)
    with pytest.raises(BadRequest, match="older package"):
        Deployments(replica).check(archive.digest(older), created(older, keys), rollback=False)
    replica.close()


def test_the_floor_survives_pruning(tmp_path):
    keys = tmp_path / "keys"
    older = signed_package(tmp_path / "older.ftpkg", keys)
    newer = signed_package(tmp_path / "newer.ftpkg", keys)
    path = tmp_path / "audit" / "gateway.jsonl"
    floor_at(path, newer, keys)
    audit = AuditLog(path, KEY, retention_days=1, writer=True)
    deployments = Deployments(audit)
    assert audit.prune(at=datetime.now(UTC) + timedelta(days=3)) == 1  # the package.served record is gone
    audit.close()
    audit = AuditLog(path, KEY, writer=True)
    with pytest.raises(BadRequest, match="older package"):
        Deployments(audit).check(archive.digest(older), created(older, keys), rollback=False)
    assert deployments.state["floor"] == Deployments(audit).state["floor"] != ""
    audit.close()


def test_a_key_file_loosened_while_the_gateway_runs_is_refused_not_trusted(tmp_path):
    """Finding 7: another user makes keys/api_keys.json 0666 and appends a key of their own. Before: accepted live."""
    path = tmp_path / "api_keys.json"
    store = KeyStore(path)
    mine = store.add("alice", "analyst")
    assert store.identify(f"Bearer {mine}").role == "analyst"
    os.chmod(path, 0o666)
    planted = KeyStore(tmp_path / "other.json")
    theirs = planted.add("mallory", "admin")
    entries = json.loads(path.read_text())["keys"] + json.loads((tmp_path / "other.json").read_text())["keys"]
    path.write_text(json.dumps({"keys": entries}))
    for key in (theirs, mine):
        with pytest.raises(Denied) as refused:
            store.identify(f"Bearer {key}")
        assert refused.value.status == 503 and refused.value.reason == "key_file_unsafe"
    os.chmod(path, 0o600)  # the owner has looked at the file and made it owner-only again
    assert store.identify(f"Bearer {mine}").role == "analyst"
    with pytest.raises(ValueError, match="no group or other user can write"):
        os.chmod(path, 0o620)
        KeyStore(path)


@pytest.mark.slow
def test_a_gateway_whose_audit_volume_fills_answers_503_and_alerts(tmp_path):
    """Finding 4, end to end: the running gateway's file-size limit lowered (prlimit) to just above its log, as a full
    volume would. Before: requests went on being served, unaudited. Now: 503 as soon as a record cannot be written,
    the log still verifies, and once writes work again the gap is chained and auditors see the alert."""
    from test_serve import STOPPED, Served

    served = Served(tmp_path / "gateway", None, {"upstream": "http://127.0.0.1:9"}, keys_dir=tmp_path)
    try:
        # An upstream that never answers: the gateway serves its own endpoints only (/readyz stays 503).
        wait_for(lambda: _answers(served) == 200, "the gateway", 60, every=0.3)
        analyst = served.http("analyst")
        log = served.root / "audit.jsonl"
        limit = log.stat().st_size + 1500
        resource.prlimit(served.process.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        statuses = [analyst.get("/v1/deployment").status_code for _ in range(12)]
        assert 503 in statuses, statuses
        refused = analyst.get("/v1/deployment")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "audit_unavailable"
        assert log.stat().st_size <= limit and log.read_bytes().endswith(b"\n")
        resource.prlimit(served.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert analyst.get("/v1/deployment").status_code == 200
        alerts = served.http("auditor").get("/audit/alerts").json()["alerts"]
        assert "audit_write_failed" in {a["kind"] for a in alerts}
    finally:
        assert served.stop() in STOPPED
    records = list(AuditLog(log, (served.root / "audit.key").read_bytes()).records())
    gap = [r for r in records if r["event"] == "audit.unwritten"]
    assert len(gap) == 1 and gap[0]["count"] == statuses.count(503) + 1
    assert AuditLog(log, (served.root / "audit.key").read_bytes()).verify()["records"] == len(records)


def _answers(served) -> int:
    try:
        return served.http("analyst").get("/v1/deployment").status_code
    except Exception:  # not listening yet
        return 0
