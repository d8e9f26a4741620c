"""The CLI's two streams and quiet third-party loggers. Results (tables, summaries, JSON) go to stdout
(`results`), logs and progress to stderr (`console`), so `dreamshard inspect RUN > f` or `| jq` gets the
data alone. On a terminal both are rich; in a pipe or a log file nothing is cut or wrapped at 80 columns:
tables are written at their full width and log lines are plain, one line per record."""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
import warnings
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)  # logs, progress, error lines
results = Console()  # what a command answers: stdout
UNWRAPPED = 1_000_000  # the width of a console that is not a terminal: tables and lines are never cut


def unwrap_consoles() -> None:
    """Give each console that does not write to a terminal an unlimited width (rich would assume 80)."""
    for stream in (console, results):
        stream.width = None if stream.is_terminal else UNWRAPPED  # type: ignore[assignment]


def setup_logging(verbosity: int = 0) -> None:
    """verbosity: -1 quiet (warnings only), 0 info, 1 debug."""
    unwrap_consoles()
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=verbosity > 0, rich_tracebacks=False)
        fmt, datefmt = "%(message)s", "[%X]"
    else:  # a log file: one plain, whole line per record, with the date
        handler = logging.StreamHandler(sys.stderr)
        fmt, datefmt = "%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"
    logging.basicConfig(level=level, format=fmt, datefmt=datefmt, handlers=[handler], force=True)
    if verbosity < 1:
        # Library chatter (progress bars, deprecation notes) drowns our own progress otherwise.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for name in ("diffusers", "transformers", "ray", "accelerate", "torch", "timm", "PIL"):
            logging.getLogger(name).setLevel(logging.WARNING if verbosity >= 0 else logging.ERROR)


# ------------------------------------------------------------------------------------------ progress

LOG_EVERY = 30.0  # seconds between plain progress lines when the output is not a terminal (--log-every)


def set_log_every(seconds: float | None) -> None:
    global LOG_EVERY
    if seconds is not None:
        LOG_EVERY = max(float(seconds), 0.0)


class StageProgress:
    """Progress of one long loop. On a terminal, a rich bar; in a log file (under `ray job submit`, SLURM,
    `nohup … > log`), one plain line at least every LOG_EVERY seconds and one at the end:
    `generate: 120/1200 images (10%), 41.8 images/s, ETA 0:00:26; shards 3/30, 0 retries, 0 failed workers`.
    """

    def __init__(self, name: str, total: int, unit: str, completed: int = 0, enabled: bool = True) -> None:
        self.name, self.total, self.unit, self.enabled = name, total, unit, enabled
        self.start_completed = self.completed = completed
        self.info = ""
        self.started = self.last_line = time.monotonic()
        self.lines = 0  # plain lines printed; a loop shorter than LOG_EVERY prints none, not even at the end
        self.terminal = console.is_terminal
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> StageProgress:
        if self.enabled and self.terminal:
            columns = (
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(), TextColumn(self.unit),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            )  # fmt: skip
            self._bar = Progress(*columns, console=console, transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.name, total=self.total, completed=self.completed, info="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and not self.terminal and exc[0] is None and self.lines:
            self._line()  # the log shows the loop finished

    def update(self, completed: int, info: str = "") -> None:
        self.completed, self.info = completed, info
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, info=info)
        elif self.enabled and not self.terminal and time.monotonic() - self.last_line >= LOG_EVERY:
            self._line()

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.completed - self.start_completed) / elapsed if elapsed > 0 else 0.0

    def _line(self) -> None:
        self.last_line, self.lines = time.monotonic(), self.lines + 1
        share = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        rate = self.rate
        left = self.total - self.completed
        eta = str(datetime.timedelta(seconds=round(left / rate))) if rate > 0 and left > 0 else ("0:00:00" if left <= 0 else "?")
        info = f"; {self.info}" if self.info else ""
        console.print(
            f"{self.name}: {self.completed}/{self.total} {self.unit}{share}, {rate:.3g} {self.unit}/s, ETA {eta}{info}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
