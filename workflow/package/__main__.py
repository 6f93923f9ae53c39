"""Operators' command line for packages, outside Snakemake.

    python -m workflow.package pack   MODEL_DIR PACKAGE --signing-key keys/signing.pem --key-file keys/kek.bin
    python -m workflow.package verify PACKAGE --signer-pub trusted.pub [--key-file keys/kek.bin]
    python -m workflow.package open   PACKAGE --signer-pub trusted.pub --key-file keys/kek.bin --into /dev/shm/model [--replace]
    python -m workflow.package rotate-key PACKAGE --signing-key keys/signing.pem --key-file old.bin --new-key-file new.bin

KMS options: --key-file (a local key file), or --pkcs11-module/--token/--key-label with the PIN in
$PKCS11_PIN, or --vault-url/--vault-key with the token in $VAULT_TOKEN (and --new-… for rotate-key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from workflow.package import archive
from workflow.config import VaultKms
from workflow.package.kms import KmsError, LocalKeyFile, Pkcs11Hsm, VaultTransit, pin_from


def add_kms(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(f"--{prefix}key-file", help="local key-encryption key file (created 0600 if missing when packing)")
    parser.add_argument(f"--{prefix}key-file-group", type=int, metavar="GID",
                        help="also accept a key file this group may read, never write (0440): a Kubernetes Secret under the pod's fsGroup")
    parser.add_argument(f"--{prefix}pkcs11-module", help="PKCS#11 library of the HSM, e.g. /usr/lib/softhsm/libsofthsm2.so")
    parser.add_argument(f"--{prefix}token", help="HSM token label")
    parser.add_argument(f"--{prefix}key-label", help="label of the AES key in the HSM")
    parser.add_argument(f"--{prefix}vault-url", help="HashiCorp Vault address (Transit engine)")
    parser.add_argument(f"--{prefix}vault-key", help="Vault Transit key name")
    parser.add_argument(f"--{prefix}vault-mount", default=VaultKms().mount_point, help="Vault Transit engine mount point")


def kms_from(args: argparse.Namespace, prefix: str = "", create: bool = False):
    get = lambda name: getattr(args, prefix.replace("-", "_") + name)  # noqa: E731
    if get("key_file"):
        return LocalKeyFile(get("key_file"), create=create, group=get("key_file_group"))
    if get("pkcs11_module"):
        return Pkcs11Hsm(get("pkcs11_module"), get("token"), get("key_label"), pin_from("PKCS11_PIN"))
    if get("vault_url"):
        return VaultTransit(get("vault_url"), get("vault_key"), get("vault_mount"))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow.package", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="encrypt and sign a model or engine folder")
    pack.add_argument("source")
    pack.add_argument("package")
    pack.add_argument("--signing-key", required=True)
    pack.add_argument("--provenance", help="JSON file with the attestation's predicate")
    pack.add_argument("--chunk-mb", type=int, default=4)
    add_kms(pack)
    for name in ("verify", "open"):
        sub = commands.add_parser(name, help=f"{name} a package")
        sub.add_argument("package")
        sub.add_argument("--signer-pub", required=True, help="the trusted signer's public key (PEM)")
        add_kms(sub)
        if name == "open":
            sub.add_argument("--into", required=True, help="a new folder on a memory-backed filesystem (/dev/shm, tmpfs), created 0700; "
                             "an existing one must be yours, 0700 and empty")
            sub.add_argument("--replace", action="store_true", help="first empty an existing --into that is yours and 0700 "
                             "(the copy an earlier open left, e.g. a restarted Kubernetes init container's)")
    rotate = commands.add_parser("rotate-key", help="re-wrap the data key under a new KMS key, without re-encrypting")
    rotate.add_argument("package")
    rotate.add_argument("--signing-key", required=True)
    add_kms(rotate)
    add_kms(rotate, "new-")
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            kms = kms_from(args, create=True)
            if kms is None:
                parser.error("pack needs a KMS: --key-file, --pkcs11-module or --vault-url")
            provenance = json.loads(open(args.provenance).read()) if args.provenance else {}
            manifest = archive.pack(args.source, args.package, kms, archive.load_signing_key(args.signing_key), provenance, args.chunk_mb << 20)
            print(f"packed {len(manifest['files'])} files into {args.package}; sha256 {archive.digest(args.package)}; signer {manifest['signer']}")
        elif args.command == "verify":
            manifest = archive.verify(args.package, archive.load_public_key(args.signer_pub), kms_from(args))
            print(f"verified {args.package}: {len(manifest['files'])} files, signer {manifest['signer']}, sha256 {archive.digest(args.package)}")
        elif args.command == "open":
            opened = archive.open_package(args.package, archive.load_public_key(args.signer_pub), kms_from(args), into=args.into,
                                         replace=args.replace)
            print(f"opened {args.package} into {opened}")
        else:
            new = kms_from(args, "new-", create=True)
            kms = archive.rotate_key(args.package, archive.load_signing_key(args.signing_key, create=False), kms_from(args), new)
            print(f"data key of {args.package} now wrapped by {kms['key_id']}")
    except (archive.PackageError, KmsError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
