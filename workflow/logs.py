"""Send a job's logging, prints and library warnings to its Snakemake log file; keep the console (the terminal
Snakemake runs in) for progress lines (workflow/progress.py)."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

CONSOLE_ENV = "FT2PROD_CONSOLE"
_console: TextIO | None = None


def to_file(path: str) -> None:
    global _console
    # The job's stderr before the redirect is Snakemake's console: keep a descriptor of it for progress lines.
    _console = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    # The job's child processes (the fine-tune's ranks) reopen it by this path while the job lives (Linux).
    os.environ[CONSOLE_ENV] = f"/proc/{os.getpid()}/fd/{_console.fileno()}"
    handle = open(path, "a", buffering=1, encoding="utf-8")
    # Point the OS-level descriptors too, so C extensions and child processes write there as well.
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    sys.stdout = sys.stderr = handle
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=handle, force=True)


def console() -> TextIO | None:
    """The console a job was started from, once to_file has sent its output to the log (in the job or a child
    process of it); None otherwise, or where it cannot be reopened (another node)."""
    global _console
    if _console is None and os.environ.get(CONSOLE_ENV):
        try:
            _console = open(os.environ[CONSOLE_ENV], "a", buffering=1, encoding="utf-8", errors="replace")
        except OSError:
            os.environ.pop(CONSOLE_ENV)
    return _console
