"""The progress helper in real time: lines with done/total, rate and ETA at the interval, also when no update comes,
a final line, and the console path a Snakemake job takes (a log file for the job, its console kept apart)."""

import io
import json
import logging
import re
import subprocess
import sys
import time

import pytest

from workflow.progress import Progress

LINE = re.compile(r"^work: (?:(\w+) )?(\d+)/10 step \((\d+)%\), ([\d.e+]+) step/s, elapsed [\d:]+(?:, ETA ([\d:?]+))?")


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.monotonic(), record.getMessage()))


def logger_with(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test.progress.{id(handler)}")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def test_lines_come_at_the_interval_with_rate_and_eta():
    lines = Lines()
    console = io.StringIO()  # not a terminal: plain lines there too
    with Progress(10, "work", unit="step", interval=0.2, logger=logger_with(lines), console=console) as progress:
        for _ in range(10):
            time.sleep(0.1)
            progress.update(1, loss=0.5)
    texts = [text for _, text in lines.records]
    assert texts[0].startswith("work: started 0/10 step (0%)") and texts[-1].startswith("work: done 10/10 step (100%)")
    beats = texts[1:-1]
    assert 3 <= len(beats) <= 6, texts  # ~1 s of work at 0.2 s
    for text in beats:
        match = LINE.match(text)
        assert match, text
        done, rate = int(match[2]), float(match[4])
        assert 0 < done < 10 and 2.5 <= rate <= 12, text  # 10 steps a second on average, less in the first beat
        assert match[5] and match[5] != "?" and text.endswith("loss 0.5")
    gaps = [b - a for (a, _), (b, _) in zip(lines.records, lines.records[1:])]
    assert max(gaps) < 0.2 + 0.15, gaps
    assert console.getvalue().splitlines() == texts


def test_a_step_longer_than_the_interval_still_reports():
    lines = Lines()
    with Progress(None, "build", interval=0.1, logger=logger_with(lines), console=io.StringIO()):
        time.sleep(0.55)  # one long step, no update: the heartbeat reports the elapsed time
    texts = [text for _, text in lines.records]
    assert len(texts) >= 5 and all(re.match(r"build: (started |done )?elapsed 00:0\d$", t) for t in texts), texts
    assert texts[-1].startswith("build: done")


def test_resumed_work_counts_its_rate_from_where_it_resumed():
    lines = Lines()
    with Progress(10, "work", unit="step", initial=6, interval=10, logger=logger_with(lines), console=io.StringIO()) as progress:
        time.sleep(0.2)
        progress.update(2)
        text = progress.line()
    match = LINE.match(text)
    assert match and int(match[2]) == 8 and 5 <= float(match[4]) <= 11, text  # 2 steps in 0.2 s, not 8


def test_a_job_writes_lines_to_its_log_and_its_console(tmp_path):
    job = tmp_path / "job.log"
    script = f"""
import time
from workflow.logs import to_file
to_file({str(job)!r})
from workflow.progress import Progress
print("job output")
with Progress(3, "work", unit="step", interval=0.1) as progress:
    for _ in range(3):
        time.sleep(0.1)
        progress.update(1)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    console, log = done.stderr.splitlines(), job.read_text()
    assert "job output" in log and "job output" not in done.stdout + done.stderr
    assert console[0].startswith("work: started 0/3") and console[-1].startswith("work: done 3/3 step (100%)")
    assert len(console) >= 4 and all(line in log for line in console)


def test_a_child_process_of_a_job_writes_to_the_jobs_console(tmp_path):
    # The fine-tune's ranks are children of the job: their lines reach the console Snakemake runs in too.
    child = "from workflow.progress import Progress\nwith Progress(2, 'rank', unit='step', interval=5) as p:\n    p.update(2)\n"
    script = f"""
import subprocess, sys
from workflow.logs import to_file
to_file({str(tmp_path / "job.log")!r})
subprocess.run([sys.executable, "-c", {child!r}], check=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert [line.split(",")[0] for line in done.stderr.splitlines()] == ["rank: started 0/2 step (0%)", "rank: done 2/2 step (100%)"]


@pytest.mark.slow
def test_finetune_reports_steps_with_loss_and_tokens_per_second(tiny_base, tracking, tmp_path):
    """The real launch (one rank, three steps): its log carries the step progress with the loss and tokens/s."""
    from workflow.config import FinetuneConfig
    from workflow.finetune.launch import finetune

    data = tmp_path / "data"
    data.mkdir()
    rows = [list(range(5 + i, 37 + i)) for i in range(12)]
    (data / "train.jsonl").write_text("".join(json.dumps({"input_ids": r, "labels": [-100] * 8 + r[8:]}) + "\n" for r in rows))
    cfg = FinetuneConfig(nproc_per_node=1, max_steps=3, micro_batch_size=4, logging_steps=1, save_steps=100)
    finetune(tiny_base, data, tmp_path / "summary.json", cfg, 3, tracking, tmp_path / "finetune.log")
    lines = [line for line in (tmp_path / "finetune.log").read_text().splitlines() if "workflow.progress: finetune:" in line]
    assert "finetune: started 0/3 step (0%)" in lines[0]
    assert re.search(r"finetune: done 3/3 step \(100%\), [\d.]+ step/s, elapsed [\d:]+, loss [\d.]+, tokens/s \d+$", lines[-1])
