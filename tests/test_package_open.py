"""`package open --into` and manifest paths under attack: each test performs the attack for real (a planted link,
a folder others can enter or that another user owns, a package whose signed manifest names `../x` or `/abs`, made
and signed with the test's own key) and checks that nothing lands outside the folder and no plaintext is exposed."""

import base64
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from workflow.package import archive
from workflow.package.__main__ import main
from workflow.package.chunks import aad, key_check, nonce
from workflow.package.kms import LocalKeyFile
from workflow.package.signing import FORMAT, attestation, write_signed

CHUNK = 64


@pytest.fixture
def keys(tmp_path):
    return LocalKeyFile(str(tmp_path / "keys" / "kek.bin")), archive.load_signing_key(tmp_path / "keys" / "signing.pem")


@pytest.fixture
def packed(tmp_path, keys):
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "model.onnx.data").write_bytes(os.urandom(300))
    (source / "genai_config.json").write_text('{"model": {}}')
    (source / "sub" / "tokenizer.json").write_text("{}")
    archive.pack(source, tmp_path / "pkg", keys[0], keys[1], {}, chunk_size=CHUNK)
    return tmp_path / "pkg"


def forge(out: Path, kms, signer, files: list[tuple[str, bytes]], ciphertext: dict[int, str] | None = None) -> Path:
    """A package whose manifest names `files` exactly as given, encrypted and signed for real by the test's own keys:
    what a compromised or careless signer could publish. Each content fits one chunk."""
    data_key = AESGCM.generate_key(bit_length=256)
    aead = AESGCM(data_key)
    header = {"format": FORMAT, "chunk_size": CHUNK, "kms": {"provider": kms.provider, "key_id": kms.key_id()},
              "wrapped_key": kms.wrap(data_key), "key_check": key_check(data_key),
              "files": [{"path": path, "size": len(content), "chunks": 1} for path, content in files]}
    entries = []
    for index, (path, content) in enumerate(files):
        sealed = aead.encrypt(nonce(index, 0), content, aad(path, 0, True))
        name = (ciphertext or {}).get(index, f"payload/{index:05d}.bin")
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(sealed)
        entries.append({"path": path, "size": len(content), "sha256": hashlib.sha256(content).hexdigest(),
                        "ciphertext": name, "ciphertext_sha256": hashlib.sha256(sealed).hexdigest()})
    out.mkdir(parents=True, exist_ok=True)
    write_signed(out, header, attestation(entries, {}), entries, signer)
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_open_makes_the_folder_0700_and_every_file_0600(packed, keys, shm):
    opened = archive.open_package(packed, keys[1].public_key(), keys[0], into=shm / "model")
    assert mode(opened) == 0o700 and mode(opened / "sub") == 0o700
    assert {p.name: mode(p) for p in opened.rglob("*") if p.is_file()} == {
        "model.onnx.data": 0o600, "genai_config.json": 0o600, "tokenizer.json": 0o600, archive.OPENED_FROM: 0o600}
    assert (opened / "genai_config.json").read_text() == '{"model": {}}'
    assert archive.opened_from(opened)["sha256"] == archive.digest(packed)


def test_open_refuses_a_folder_that_already_holds_something(packed, keys, shm, tmp_path, capsys):
    into = shm / "model"
    into.mkdir(mode=0o700)
    (into / "genai_config.json").write_text("the attacker's engine config")
    with pytest.raises(archive.UnsafeDestination, match=r"already holds 1 entries \(genai_config.json"):
        archive.open_package(packed, keys[1].public_key(), keys[0], into=into)
    assert (into / "genai_config.json").read_text() == "the attacker's engine config"
    assert os.listdir(into) == ["genai_config.json"]
    public = tmp_path / "trusted.pub"
    public.write_bytes((packed / "signer.pub").read_bytes())
    assert main(["open", str(packed), "--signer-pub", str(public), "--key-file", keys[0].path, "--into", str(into)]) == 2
    assert "UnsafeDestination: refusing to open into" in capsys.readouterr().err


@pytest.mark.parametrize("loose", [0o755, 0o750, 0o1777])
def test_open_refuses_a_folder_others_can_enter(packed, keys, shm, loose):
    into = shm / "model"
    into.mkdir()
    os.chmod(into, loose)
    with pytest.raises(archive.UnsafeDestination, match=f"its mode {loose:04o} lets other users in; it must be 0700"):
        archive.open_package(packed, keys[1].public_key(), keys[0], into=into)
    assert os.listdir(into) == []


def test_open_refuses_a_folder_another_user_owns(packed, keys, shm):
    into = shm / "model"
    into.mkdir(mode=0o700)
    try:
        os.chown(into, 4242, 4242)  # a folder another user made (and could read our plaintext from)
    except PermissionError:
        pytest.skip("making a folder that another user owns needs root (chown); run the tests as root to cover it")
    with pytest.raises(archive.UnsafeDestination, match=r"owned by uid 4242, not by this user"):
        archive.open_package(packed, keys[1].public_key(), keys[0], into=into)
    assert os.listdir(into) == []


def test_open_refuses_a_symlink_as_the_folder(packed, keys, shm):
    elsewhere = shm / "elsewhere"  # private, empty, on tmpfs: only the link is wrong
    elsewhere.mkdir(mode=0o700)
    (shm / "model").symlink_to(elsewhere)
    with pytest.raises(archive.UnsafeDestination, match=r"it is a symbolic link \(to .*elsewhere\)"):
        archive.open_package(packed, keys[1].public_key(), keys[0], into=shm / "model")
    assert os.listdir(elsewhere) == []


class PlantingKms:
    """The real key, but while open asks for it (after the folder was checked) a link is planted inside the folder."""

    def __init__(self, kms, link: Path, target: Path) -> None:
        self.kms, self.link, self.target, self.provider = kms, link, target, kms.provider

    def key_id(self):
        return self.kms.key_id()

    def unwrap(self, wrapped):
        self.link.symlink_to(self.target)
        return self.kms.unwrap(wrapped)


def test_a_link_planted_for_a_file_is_not_followed(packed, keys, shm, tmp_path):
    into, outside = shm / "model", tmp_path / "on-disk.json"
    into.mkdir(mode=0o700)
    outside.write_text("untouched")
    with pytest.raises(archive.UnsafeDestination, match="refusing to write genai_config.json into"):
        archive.open_package(packed, keys[1].public_key(), PlantingKms(keys[0], into / "genai_config.json", outside), into=into)
    assert outside.read_text() == "untouched"  # no plaintext written through the link, onto disk
    assert os.listdir(into) == []  # the link and everything written before it are gone


def test_a_link_planted_for_a_folder_is_not_followed(packed, keys, shm, tmp_path):
    into, outside = shm / "model", tmp_path / "on-disk"
    into.mkdir(mode=0o700)
    outside.mkdir()
    with pytest.raises(archive.UnsafeDestination, match="refusing to write sub/tokenizer.json into"):
        archive.open_package(packed, keys[1].public_key(), PlantingKms(keys[0], into / "sub", outside), into=into)
    assert os.listdir(outside) == [] and os.listdir(into) == []


def test_replace_empties_our_own_earlier_copy_but_nothing_else(packed, keys, shm):
    into = shm / "model"
    archive.open_package(packed, keys[1].public_key(), keys[0], into=into)
    (into / "stale.bin").write_bytes(b"left by an earlier open")
    with pytest.raises(archive.UnsafeDestination, match="already holds"):
        archive.open_package(packed, keys[1].public_key(), keys[0], into=into)
    archive.open_package(packed, keys[1].public_key(), keys[0], into=into, replace=True)
    assert sorted(os.listdir(into)) == ["genai_config.json", "model.onnx.data", archive.OPENED_FROM, "sub"]
    os.chmod(into, 0o755)
    with pytest.raises(archive.UnsafeDestination, match="lets other users in"):
        archive.open_package(packed, keys[1].public_key(), keys[0], into=into, replace=True)
    assert "genai_config.json" in os.listdir(into)
    (shm / "link").symlink_to(into)
    with pytest.raises(archive.UnsafeDestination, match="symbolic link"):
        archive.open_package(packed, keys[1].public_key(), keys[0], into=shm / "link", replace=True)


@pytest.mark.parametrize("escape", ["../escaped.bin", "sub/../../escaped.bin", "{abs}"])
def test_a_signed_manifest_path_that_leaves_the_folder_is_refused(keys, shm, tmp_path, escape):
    """A package made and signed with the test's own (trusted) key whose manifest names ../escaped.bin or an absolute
    path: open must not write outside its folder, and verify refuses it before any key is used."""
    absolute = tmp_path / "abs-escaped.bin"
    escape = escape.format(abs=absolute)
    package = forge(tmp_path / "evil", keys[0], keys[1], [("genai_config.json", b"{}"), (escape, b"plaintext weights")])
    with pytest.raises(archive.UnsafePath, match="manifest path"):
        archive.verify(package, keys[1].public_key())
    with pytest.raises(archive.UnsafePath):
        archive.open_package(package, keys[1].public_key(), keys[0], into=shm / "model")
    assert not (shm / "escaped.bin").exists() and not absolute.exists()
    assert not (shm / "model").exists()


@pytest.mark.parametrize("path, reason", [
    ("a\\b.bin", "backslash"), ("./a.bin", r"'\.' or '\.\.' part"), ("a//b.bin", "empty"), ("", "non-empty"),
    ("x\0y", "NUL"), ("/etc/cron.d/x", "absolute"),
])
def test_malformed_manifest_paths_are_refused_at_verify(keys, tmp_path, path, reason):
    package = forge(tmp_path / "evil", keys[0], keys[1], [(path, b"data")])
    with pytest.raises(archive.UnsafePath, match=reason):
        archive.verify(package, keys[1].public_key())


def test_a_path_listed_twice_is_refused(keys, shm, tmp_path):
    package = forge(tmp_path / "dup", keys[0], keys[1], [("model.bin", b"the real weights"), ("model.bin", b"other weights")])
    with pytest.raises(archive.UnsafePath, match="'model.bin' is listed twice"):
        archive.verify(package, keys[1].public_key(), keys[0])
    with pytest.raises(archive.UnsafePath):
        archive.open_package(package, keys[1].public_key(), keys[0])


def test_a_path_that_is_both_a_file_and_a_folder_is_refused(keys, tmp_path):
    package = forge(tmp_path / "both", keys[0], keys[1], [("a", b"file"), ("a/b", b"file in folder a")])
    with pytest.raises(archive.UnsafePath, match="'a' is both a file and the folder of another file"):
        archive.verify(package, keys[1].public_key())


def test_ciphertext_named_outside_the_payload_is_refused(keys, tmp_path):
    """The signed manifest points a file's ciphertext at ../outside.bin: verify must not read outside the package."""
    package = forge(tmp_path / "evil", keys[0], keys[1], [("a.bin", b"data")], ciphertext={0: "../outside.bin"})
    assert (tmp_path / "outside.bin").exists()
    with pytest.raises(archive.UnsafePath, match="names ciphertext '../outside.bin'; file 0 must be 'payload/00000.bin'"):
        archive.verify(package, keys[1].public_key(), keys[0])


def test_ciphertext_the_manifest_does_not_list_is_refused(packed, keys):
    (packed / "payload" / "00099.bin").write_bytes(b"smuggled")
    with pytest.raises(archive.UnsafePath, match="payload/00099.bin is not listed in the signed manifest"):
        archive.verify(packed, keys[1].public_key())


def test_a_payload_file_that_is_a_link_is_refused(packed, keys, tmp_path):
    first = packed / "payload" / "00000.bin"
    shutil.move(first, tmp_path / "moved.bin")
    first.symlink_to(tmp_path / "moved.bin")  # same bytes, but read through a link out of the package
    with pytest.raises(archive.UnsafePath, match="payload/00000.bin is not a regular file"):
        archive.verify(packed, keys[1].public_key(), keys[0])


def test_pack_refuses_a_file_name_verify_would_refuse(keys, tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    (source / "a\\b.bin").write_bytes(b"x")
    with pytest.raises(archive.UnsafePath, match="backslash"):
        archive.pack(source, tmp_path / "pkg", keys[0], keys[1], {})
    assert not (tmp_path / "pkg").exists()


def test_a_signed_manifest_still_round_trips(packed, keys):
    """The checks refuse nothing pack makes."""
    manifest = json.loads((packed / "manifest.json").read_text())
    assert archive.verify(packed, keys[1].public_key(), keys[0]) == manifest
    assert base64.b64decode((packed / "manifest.sig").read_text())
