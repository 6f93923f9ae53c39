"""Progress of a long job, with rate and ETA, every stage alike: a tqdm bar where the console is a terminal, and
otherwise a plain line; and always a line in the job's log, at least every `interval` seconds (a heartbeat thread
writes it, so a step that takes longer than the interval still reports).

    with Progress(len(prompts), "evaluate: generation", unit="prompt") as progress:
        for batch in batches:
            ...
            progress.update(len(batch), loss=0.71)

`total=None` is for work whose size is not known (an engine build in another program): the lines then give the
elapsed time. The console is the terminal Snakemake runs in (workflow.logs.console(); the job's own stdout and
stderr go to its log file); without one (tests, library use) the lines go to the logger only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

from workflow import logs

INTERVAL_S = 30.0
"""Seconds between progress lines in a job's log (and on a console that is not a terminal)."""

log = logging.getLogger("workflow.progress")
T = TypeVar("T")


def status_text(status: dict) -> str:
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in status.items())


class Progress:
    """Count work done against `total`; report done/total, rate and ETA (see the module docstring)."""

    def __init__(self, total: int | None, what: str, unit: str = "it", initial: int = 0, interval: float = INTERVAL_S,
                 logger: logging.Logger = log, console: TextIO | None = None) -> None:
        self.total, self.what, self.unit, self.initial, self.interval = total, what, unit, initial, interval
        self.logger, self.console = logger, console if console is not None else logs.console()
        self.done, self.status = initial, {}
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.bar: tqdm | None = None
        self.began = time.monotonic()
        self.thread = threading.Thread(target=self._beat, name=f"progress: {what}", daemon=True)

    def __enter__(self) -> Progress:
        self.began = time.monotonic()
        if self.console is not None and self.console.isatty():
            self.bar = tqdm(total=self.total, initial=self.initial, desc=self.what, unit=self.unit, file=self.console,
                            dynamic_ncols=True)
        self.emit("started")
        self.thread.start()
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.stopped.set()
        self.thread.join()
        if self.bar is not None:
            self.bar.close()
        self.emit("failed" if kind else "done")

    def update(self, n: int = 1, **status) -> None:
        """n more units done; `status` (e.g. loss=0.71) is shown with every line from now on."""
        with self.lock:
            self.done += n
            self.status.update(status)
            if self.bar is not None:
                self.bar.update(n)
                if status:
                    self.bar.set_postfix_str(status_text(self.status), refresh=False)

    def counted(self, items: Iterable[T]) -> Iterator[T]:
        """The items, each counted as one unit done when the loop over them asks for the next."""
        for item in items:
            yield item
            self.update(1)

    def line(self, state: str = "") -> str:
        """`what: done/total unit (pct), rate unit/s, elapsed, ETA` and the status, as one line."""
        with self.lock:
            done, status = self.done, dict(self.status)
        elapsed = time.monotonic() - self.began
        rate = (done - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = []
        if self.total is not None:
            parts.append(f"{done}/{self.total} {self.unit}" + (f" ({done / self.total:.0%})" if self.total else ""))
        elif done:
            parts.append(f"{done} {self.unit}")
        if self.total is not None or done > self.initial:
            parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}")
        if self.total is not None and state != "done":
            parts.append(f"ETA {tqdm.format_interval((self.total - done) / rate) if rate > 0 else '?'}")
        if status:
            parts.append(status_text(status))
        return f"{self.what}: {state + ' ' if state else ''}" + ", ".join(parts)

    def emit(self, state: str = "") -> None:
        text = self.line(state)
        self.logger.info(text)
        if self.bar is None and self.console is not None:
            self.console.write(text + "\n")
            self.console.flush()

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            self.emit()
