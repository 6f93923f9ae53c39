"""The progress lines of a real job that runs past 30 s: package encryption (workflow.package.archive.pack) of a
file of random bytes, with a throwaway key, in a temporary folder; prints the job's log lines.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/progress_sample.py [--gib 6]
"""

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from workflow.package import archive
from workflow.package.kms import LocalKeyFile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=6, help="size of the file to encrypt, GiB")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "model").mkdir()
        block = os.urandom(64 << 20)
        with open(root / "model" / "weights.bin", "wb") as handle:
            for _ in range(args.gib * 16):
                handle.write(block)
        archive.pack(root / "model", root / "package", LocalKeyFile(str(root / "keys" / "kek.bin")),
                     archive.load_signing_key(root / "keys" / "signing.pem"), {})


if __name__ == "__main__":
    main()
