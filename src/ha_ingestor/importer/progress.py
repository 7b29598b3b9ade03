"""Progress of a long import: a bar with rate and ETA on a terminal (rich), log lines otherwise.

Progress is measured in seconds of history covered (every phase knows its span up front,
while the number of rows is only known once read); the rate shown is rows per second.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any, Protocol, Self

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_LOG_EVERY = 5.0  # seconds between plain progress lines


class ImportProgress(Protocol):
    """One phase at a time: ``begin`` it, ``advance`` per finished window, ``end`` it."""

    def begin(self, phase: str, span_s: float) -> None: ...

    def advance(self, covered_s: float, rows: int) -> None: ...

    def end(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


class _ConsoleStream:
    """Log records written above the bar instead of through it."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def write(self, text: str) -> int:
        self._console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass


class BarProgress:
    """rich's progress bar on stderr, log records printed above it while it runs."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description:<18}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rows]:>9,} rows {task.fields[rate]:>8,.0f}/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self._console,
        )
        self._task: TaskID | None = None
        self._began = 0.0
        self._rows = 0
        self._saved: list[tuple[logging.StreamHandler[Any], Any]] = []

    def __enter__(self) -> Self:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                self._saved.append((handler, handler.setStream(_ConsoleStream(self._console))))
        self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._progress.stop()
        for handler, stream in self._saved:
            handler.setStream(stream)
        self._saved.clear()

    def begin(self, phase: str, span_s: float) -> None:
        self._began = time.monotonic()
        self._rows = 0
        self._task = self._progress.add_task(phase, total=max(span_s, 1e-9), rows=0, rate=0.0)

    def advance(self, covered_s: float, rows: int) -> None:
        assert self._task is not None
        self._rows += rows
        rate = self._rows / max(time.monotonic() - self._began, 1e-9)
        self._progress.update(self._task, advance=covered_s, rows=self._rows, rate=rate)

    def end(self) -> None:
        if self._task is not None:
            task = self._progress.tasks[self._task]
            self._progress.update(self._task, completed=task.total)
        self._task = None


class LogProgress:
    """Plain log lines (``import progress``), at most one per few seconds, and one per phase end."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._log = structlog.get_logger("ha_ingestor.import")
        self._clock = clock
        self._phase = ""
        self._span = 0.0
        self._covered = 0.0
        self._rows = 0
        self._began = 0.0
        self._logged = 0.0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def begin(self, phase: str, span_s: float) -> None:
        self._phase, self._span = phase, max(span_s, 1e-9)
        self._covered, self._rows = 0.0, 0
        self._began = self._logged = self._clock()

    def advance(self, covered_s: float, rows: int) -> None:
        self._covered += covered_s
        self._rows += rows
        if self._clock() - self._logged >= _LOG_EVERY:
            self._line("import progress")

    def end(self) -> None:
        self._covered = self._span
        self._line("import phase done")

    def _line(self, message: str) -> None:
        now = self._clock()
        self._logged = now
        elapsed = max(now - self._began, 1e-9)
        done = min(self._covered / self._span, 1.0)
        eta = elapsed * (1 - done) / done if done > 0 else None
        self._log.info(
            message,
            phase=self._phase,
            percent=round(done * 100, 1),
            rows=self._rows,
            rows_per_s=round(self._rows / elapsed),
            elapsed_s=round(elapsed, 1),
            eta_s=round(eta, 1) if eta is not None else None,
        )


def progress_for(stream: Any = None) -> ImportProgress:
    """A bar when ``stream`` (stderr) is a terminal, log lines otherwise."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return BarProgress()
    return LogProgress()
