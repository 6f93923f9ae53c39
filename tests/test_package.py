import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from workflow.package import archive
from workflow.package.kms import KmsError, LocalKeyFile, Pkcs11Hsm

CHUNK = 64  # tiny chunks so every file spans several


@pytest.fixture
def model_dir(tmp_path):
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "model.onnx.data").write_bytes(os.urandom(1000))
    (source / "genai_config.json").write_text('{"model": {}}')
    (source / "sub" / "empty.bin").write_bytes(b"")
    return source


@pytest.fixture
def keys(tmp_path):
    return LocalKeyFile(str(tmp_path / "keys" / "kek.bin")), archive.load_signing_key(tmp_path / "keys" / "signing.pem")


@pytest.fixture
def packed(tmp_path, model_dir, keys):
    kms, signer = keys
    archive.pack(model_dir, tmp_path / "pkg", kms, signer, {"base_model": {"sha256": "x"}}, chunk_size=CHUNK)
    return tmp_path / "pkg"


def test_round_trip_in_memory(packed, model_dir, keys):
    kms, signer = keys
    manifest = archive.verify(packed, signer.public_key(), kms)
    assert {f["path"] for f in manifest["files"]} == {"model.onnx.data", "genai_config.json", "sub/empty.bin"}
    files = archive.open_package(packed, signer.public_key(), kms)
    assert files == {p: (model_dir / p).read_bytes() for p in files}
    statement = json.loads((packed / "attestation.json").read_text())
    assert statement["_type"] == "https://in-toto.io/Statement/v1" and len(statement["subject"]) == 3


def test_no_plaintext_in_the_package(packed, model_dir):
    secret = (model_dir / "model.onnx.data").read_bytes()
    for path in packed.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(secret[i : i + 32] in data for i in range(0, len(secret) - 32, 32)), path


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def payload(packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    return packed / next(f["ciphertext"] for f in manifest["files"] if f["path"] == "model.onnx.data")


def test_tampered_byte(packed, keys):
    flip_byte(payload(packed), 100)
    with pytest.raises(archive.TamperedPackage, match="model.onnx.data: chunk 1 fails authentication"):
        archive.verify(packed, keys[1].public_key(), keys[0])
    with pytest.raises(archive.TamperedPackage, match="model.onnx.data: ciphertext digest differs from the signed manifest"):
        archive.verify(packed, keys[1].public_key())  # without the key: the signed digests still catch it


def test_missing_chunk(packed, keys):
    data = payload(packed).read_bytes()
    payload(packed).write_bytes(data[: 10 * (CHUNK + 16)])
    with pytest.raises(archive.MissingChunk, match="model.onnx.data: chunk 10 of 16 is missing"):
        archive.open_package(packed, keys[1].public_key(), keys[0])


def test_reordered_chunks(packed, keys):
    stride = CHUNK + 16
    data = bytearray(payload(packed).read_bytes())
    data[0:stride], data[stride : 2 * stride] = data[stride : 2 * stride], data[0:stride]
    payload(packed).write_bytes(bytes(data))
    with pytest.raises(archive.ReorderedChunk, match="chunk 0 holds chunk 1's data"):
        archive.open_package(packed, keys[1].public_key(), keys[0])


def test_chunks_swapped_between_files_fail_authentication(tmp_path, keys):
    source = tmp_path / "two"
    source.mkdir()
    (source / "a.bin").write_bytes(b"A" * CHUNK)
    (source / "b.bin").write_bytes(b"B" * CHUNK)
    archive.pack(source, tmp_path / "p", keys[0], keys[1], {}, chunk_size=CHUNK)
    a, b = tmp_path / "p" / "payload" / "00000.bin", tmp_path / "p" / "payload" / "00001.bin"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    with pytest.raises(archive.PackageError):
        archive.open_package(tmp_path / "p", keys[1].public_key(), keys[0])


def test_wrong_key(packed, keys, tmp_path):
    other = LocalKeyFile(str(tmp_path / "other" / "kek.bin"))
    with pytest.raises(archive.WrongKey, match=r"wrong key: local:\w+ did not wrap this package's data key"):
        archive.open_package(packed, keys[1].public_key(), other)


def test_wrong_signer_and_unsigned(packed, keys, tmp_path):
    stranger = archive.load_signing_key(tmp_path / "stranger.pem")
    with pytest.raises(archive.WrongSigner, match=r"signed by ed25519:\w+, but the trusted signer is ed25519:\w+"):
        archive.verify(packed, stranger.public_key())
    # an edited manifest (here: a file size) no longer matches the trusted signer's signature
    manifest = json.loads((packed / "manifest.json").read_text())
    manifest["files"][0]["size"] += 1
    (packed / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with pytest.raises(archive.TamperedPackage, match="manifest signature does not verify"):
        archive.verify(packed, keys[1].public_key())
    (packed / "manifest.sig").unlink()
    with pytest.raises(archive.UnsignedPackage, match="unsigned package"):
        archive.open_package(packed, keys[1].public_key(), keys[0])


def test_edited_attestation_is_detected(packed, keys):
    statement = json.loads((packed / "attestation.json").read_text())
    statement["predicate"]["base_model"]["sha256"] = "y"
    (packed / "attestation.json").write_text(json.dumps(statement))
    with pytest.raises(archive.TamperedPackage, match="attestation.json was changed after signing"):
        archive.verify(packed, keys[1].public_key())


def test_open_refuses_a_disk_directory_and_writes_to_memory(packed, keys, tmp_path):
    with pytest.raises(archive.PackageError, match="not a memory-backed filesystem"):
        archive.open_package(packed, keys[1].public_key(), keys[0], into=tmp_path / "plain")
    assert not (tmp_path / "plain").exists()  # the folder open made is removed again
    shm = Path("/dev/shm") / f"ft2prod-test-{os.getpid()}"
    try:
        opened = archive.open_package(packed, keys[1].public_key(), keys[0], into=shm)
        assert (opened / "genai_config.json").read_text() == '{"model": {}}'
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_rotate_key_rewraps_without_touching_weights(packed, keys, tmp_path):
    before = payload(packed).read_bytes()
    new = LocalKeyFile(str(tmp_path / "new" / "kek.bin"))
    archive.rotate_key(packed, keys[1], keys[0], new)
    assert payload(packed).read_bytes() == before
    archive.verify(packed, keys[1].public_key(), new)
    with pytest.raises(archive.WrongKey):
        archive.open_package(packed, keys[1].public_key(), keys[0])


def test_rotate_key_signs_what_it_checked_not_a_file_swapped_in_after(packed, keys, tmp_path):
    """An attacker who can write the package folder swaps attestation.json right after rotate-key has checked it
    (while the KMS unwraps the key): the re-signed package must still attest the original provenance."""
    original = json.loads((packed / "attestation.json").read_text())
    forged = original | {"predicate": {"base_model": {"sha256": "forged"}}}
    old_kms, new = keys[0], LocalKeyFile(str(tmp_path / "new" / "kek.bin"))

    class SwappingKms:  # the old key, unwrapping for real; the swap happens while it does
        provider = old_kms.provider

        def key_id(self):
            return old_kms.key_id()

        def unwrap(self, wrapped):
            (packed / "attestation.json").write_text(json.dumps(forged))
            return old_kms.unwrap(wrapped)

    archive.rotate_key(packed, keys[1], SwappingKms(), new)
    archive.verify(packed, keys[1].public_key(), new)
    assert json.loads((packed / "attestation.json").read_text()) == original


def test_key_file_permissions(tmp_path):
    kms = LocalKeyFile(str(tmp_path / "k" / "kek.bin"))
    kms.key_id()
    assert (tmp_path / "k" / "kek.bin").stat().st_mode & 0o777 == 0o600
    os.chmod(tmp_path / "k" / "kek.bin", 0o644)
    with pytest.raises(KmsError, match="has permissions 644; it must be readable by its owner only"):
        kms.wrap(b"\0" * 32)


@pytest.fixture
def softhsm(tmp_path, monkeypatch):
    """A real SoftHSM2 token with an AES key-encryption key made inside it."""
    module = "/usr/lib/softhsm/libsofthsm2.so"
    if not Path(module).exists():
        pytest.fail("SoftHSM2 is not installed: apt-get install softhsm2 (.ci/run does)")
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "ft2prod", "--so-pin", "5678", "--pin", "1234"],
                   check=True, capture_output=True)
    import pkcs11

    token = pkcs11.lib(module).get_token(token_label="ft2prod")
    with token.open(user_pin="1234", rw=True) as session:
        session.generate_key(pkcs11.KeyType.AES, 256, label="kek", store=True,
                             capabilities=pkcs11.MechanismFlag.ENCRYPT | pkcs11.MechanismFlag.DECRYPT)
    return module


@pytest.mark.services  # softhsm2
def test_softhsm2_holds_the_key(softhsm, model_dir, keys, tmp_path):
    hsm = Pkcs11Hsm(softhsm, "ft2prod", "kek", "1234")
    archive.pack(model_dir, tmp_path / "hsm_pkg", hsm, keys[1], {}, chunk_size=CHUNK)
    header = json.loads((tmp_path / "hsm_pkg" / "header.json").read_text())
    assert header["kms"] == {"provider": "pkcs11", "key_id": "pkcs11:ft2prod/kek"}
    files = archive.open_package(tmp_path / "hsm_pkg", keys[1].public_key(), hsm)
    assert files["model.onnx.data"] == (model_dir / "model.onnx.data").read_bytes()
    with pytest.raises(archive.WrongKey, match="no AES key labelled 'other'"):
        archive.open_package(tmp_path / "hsm_pkg", keys[1].public_key(), Pkcs11Hsm(softhsm, "ft2prod", "other", "1234"))
    with pytest.raises(archive.WrongKey):
        archive.open_package(tmp_path / "hsm_pkg", keys[1].public_key(), keys[0])


def test_a_bad_last_chunk_leaves_nothing_in_memory_filesystem(packed, keys):
    data = payload(packed)
    flip_byte(data, data.stat().st_size - 3)
    shm = Path("/dev/shm") / f"ft2prod-bad-{os.getpid()}"
    try:
        with pytest.raises(archive.TamperedPackage, match="chunk 15 fails authentication"):
            archive.open_package(packed, keys[1].public_key(), keys[0], into=shm)
        assert not shm.exists()
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_command_line(model_dir, tmp_path, capsys):
    from workflow.package.__main__ import main

    keys_dir = tmp_path / "cli"
    assert main(["pack", str(model_dir), str(tmp_path / "p"), "--signing-key", str(keys_dir / "s.pem"), "--key-file", str(keys_dir / "k.bin")]) == 0
    public = tmp_path / "trusted.pub"
    public.write_bytes((tmp_path / "p" / "signer.pub").read_bytes())
    assert main(["verify", str(tmp_path / "p"), "--signer-pub", str(public), "--key-file", str(keys_dir / "k.bin")]) == 0
    assert main(["rotate-key", str(tmp_path / "p"), "--signing-key", str(keys_dir / "s.pem"), "--key-file", str(keys_dir / "k.bin"),
                 "--new-key-file", str(keys_dir / "k2.bin")]) == 0
    assert main(["verify", str(tmp_path / "p"), "--signer-pub", str(public), "--key-file", str(keys_dir / "k.bin")]) == 2
    assert "WrongKey: kms: wrong key" in capsys.readouterr().err


def test_kms_providers_from_config_and_their_refusals(monkeypatch, tmp_path):
    from workflow.config import ConfigError, Kms
    from workflow.config import settings as settings_of
    from workflow.package.kms import VaultTransit, from_config

    settings = Kms(local={"key_file": str(tmp_path / "k.bin")},
                   pkcs11={"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t", "key_label": "kek", "pin_env": "TEST_PIN"},
                   vault={"url": "https://vault.example:8200", "key_name": "ft2prod", "mount_point": "transit-prod"})
    assert isinstance(from_config(settings), LocalKeyFile)
    monkeypatch.delenv("TEST_PIN", raising=False)
    with pytest.raises(KmsError, match="pkcs11 needs the HSM user PIN in the environment variable TEST_PIN"):
        from_config(settings.model_copy(update={"provider": "pkcs11"}))
    monkeypatch.setenv("TEST_PIN", "1234")
    assert from_config(settings.model_copy(update={"provider": "pkcs11"})).pin == "1234"
    vault = from_config(settings.model_copy(update={"provider": "vault"}))
    # the configured mount point, not a second default
    assert isinstance(vault, VaultTransit) and vault.key_id() == "vault:https://vault.example:8200/transit-prod/ft2prod"
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    with pytest.raises(KmsError, match="vault needs the VAULT_TOKEN environment variable"):
        vault.wrap(b"\0" * 32)
    with pytest.raises(ConfigError, match="config: package.kms.provider: 'aws' is not allowed; allowed values: 'local', 'pkcs11', 'vault'"):
        settings_of({"package": {"kms": {"provider": "aws"}}})
