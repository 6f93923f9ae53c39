"""The one wait loop: call a check until it returns something truthy, or time out saying what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 60.0, every: float = 0.5) -> T:
    """check()'s first truthy result; TimeoutError naming `what` after `timeout` seconds. A check that raises stops
    the wait with its error (so it can fail fast, e.g. when the process it waits on has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
