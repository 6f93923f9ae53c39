"""Attacks on packages and their keys (issue 22, finding 9): rotate-key cut short by a full disk, a gateway that read
the private signing key, an empty HSM PIN, and a package swapped between deploy's check and its load."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import signed_package

from workflow.config import EngineConfig, Kms, load
from workflow.package import archive, errors
from workflow.package.kms import KmsError, LocalKeyFile, from_config
from workflow.serve.audit import AuditLog
from workflow.serve.backends import InProcess
from workflow.serve.deployments import Deployments
from workflow.serve.settings import GatewaySettings

PACKAGE_ERRORS = {name for name in dir(errors) if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), errors.PackageError)}




def signer(keys: Path):
    return archive.load_signing_key(keys / "signing.pem", create=False).public_key()


def test_a_rotate_key_cut_short_by_a_full_disk_leaves_the_package_verifying(tmp_path):
    """Before: rotate-key rewrote header.json, manifest.json and manifest.sig in place; a write refused part-way (here
    the file-size limit, as a full disk) left a package that verifies with neither key."""
    keys = tmp_path / "keys"
    package = signed_package(tmp_path / "model.ftpkg", keys, 4096)
    limit = (package / "header.json").stat().st_size - 10

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    rotate = [sys.executable, "-m", "workflow.package", "rotate-key", str(package), "--signing-key", str(keys / "signing.pem"),
              "--key-file", str(keys / "kek.bin"), "--new-key-file", str(keys / "new.bin")]
    cut = subprocess.run(rotate, capture_output=True, text=True, preexec_fn=full_disk)
    assert cut.returncode != 0
    archive.verify(package, signer(keys), LocalKeyFile(keys / "kek.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys", "model.ftpkg", "model.src"], "no half-built copy left"
    done = subprocess.run(rotate, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    archive.verify(package, signer(keys), LocalKeyFile(keys / "new.bin"))


def test_a_gateway_trusting_the_default_signer_never_reads_the_private_key(tmp_path):
    """Before: with package.trusted_signer null the gateway loaded package.signing_key, the private key, to take its
    public half. Now it reads keys/signing.pub: the private key can be absent from the gateway's host."""
    keys = tmp_path / "keys"
    package = signed_package(tmp_path / "model.ftpkg", keys, 4096)
    (keys / "signing.pem").unlink()
    (tmp_path / "config.yaml").write_text(f"package:\n  signing_key: {keys / 'signing.pem'}\n")
    trusted = GatewaySettings.from_config(load(tmp_path / "config.yaml")).trusted_signer()
    assert archive.key_id(trusted) == archive.signed_manifest(package, trusted)[0]["signer"]
    (keys / "signing.pub").unlink()
    with pytest.raises(ValueError, match="set package.trusted_signer"):
        GatewaySettings.from_config(load(tmp_path / "config.yaml")).trusted_signer()


def test_an_empty_or_missing_hsm_pin_is_refused(tmp_path, monkeypatch):
    """Before: the command line's PKCS#11 PIN defaulted to empty, and the config's accepted an empty variable."""
    settings = Kms(provider="pkcs11", pkcs11={"module": "/nonexistent.so", "token_label": "t", "key_label": "k",
                                              "pin_env": "FT2PROD_TEST_PIN"})
    monkeypatch.setenv("FT2PROD_TEST_PIN", "")
    with pytest.raises(KmsError, match="empty PIN is refused"):
        from_config(settings)
    package = signed_package(tmp_path / "model.ftpkg", tmp_path / "keys", 4096)
    env = {k: v for k, v in os.environ.items() if k != "PKCS11_PIN"}
    cli = subprocess.run([sys.executable, "-m", "workflow.package", "verify", str(package), "--signer-pub",
                          str(tmp_path / "keys" / "signing.pub"),
                          "--pkcs11-module", "/nonexistent.so", "--token", "t", "--key-label", "k"],
                         capture_output=True, text=True, env=env)
    assert cli.returncode == 2 and "PKCS11_PIN (not set)" in cli.stderr


class SwappingSettings:
    """Gateway settings whose KMS lookup, which deploy makes after its checks and before the load, is the moment the
    attacker (who can write the package root) swaps an older signed package in under the checked digest."""

    def __init__(self, root: Path, keys: Path, older: Path, digest: str) -> None:
        self.package_root, self.keys, self.older, self.digest = root, keys, older, digest

    def trusted_signer(self):
        return signer(self.keys)

    def kms(self):
        shutil.rmtree(self.package_root / self.digest)
        shutil.copytree(self.older, self.package_root / self.digest)
        return LocalKeyFile(self.keys / "kek.bin")


def test_a_package_swapped_between_the_deploy_check_and_the_load_is_refused(tmp_path):
    """Before: deploy checked the folder (digest, floor) and the load read it again, so an older signed package put
    in its place between the two was opened and served. Now the load opens by exactly what deploy checked."""
    keys = tmp_path / "keys"
    older = signed_package(tmp_path / "older.ftpkg", keys, 4096)
    newer = signed_package(tmp_path / "newer.ftpkg", keys, 4096)
    trusted = signer(keys)
    digest = archive.digest(newer)
    root = tmp_path / "packages"
    shutil.copytree(newer, root / digest)
    audit = AuditLog(tmp_path / "audit" / "gateway.jsonl", bytes(32), writer=True)
    shm = Path(tempfile.mkdtemp(prefix="ft2prod-swap-", dir="/dev/shm"))  # the load opens what deploy checked, in memory
    backend = InProcess(EngineConfig(), memory_dir=str(shm))
    backend.deployments = Deployments(audit)
    backend.deployments.record(digest, archive.signed_manifest(newer, trusted)[1]["created"])
    backend.deploy(digest, False, SwappingSettings(root, keys, older, digest))
    deadline = time.monotonic() + 30
    while backend._loading.locked() and time.monotonic() < deadline:
        time.sleep(0.05)
    # The load opens by the manifest and header deploy checked (read once): the swapped-in package's chunks do not
    # decrypt under the checked package's data key, so nothing of it is served or left in memory.
    assert backend.error and backend.error.split(":")[0] in PACKAGE_ERRORS and not backend.ready(), backend.error
    assert [r["event"] for r in audit.records()] == ["package.served"], "the older package was not recorded as served"
    assert list(shm.iterdir()) == [], "plaintext left behind"
    shm.rmdir()
    audit.close()
