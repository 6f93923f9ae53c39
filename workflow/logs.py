"""Send a job's logging, prints and library warnings to its Snakemake log file."""

from __future__ import annotations

import logging
import os
import sys


def to_file(path: str) -> None:
    handle = open(path, "a", buffering=1, encoding="utf-8")
    # Point the OS-level descriptors too, so C extensions and child processes write there as well.
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    sys.stdout = sys.stderr = handle
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=handle, force=True)
