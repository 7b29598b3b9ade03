"""Progress: a rich bar on a terminal (log records printed above it), log lines otherwise."""

from __future__ import annotations

import io
import logging

import structlog
from rich.console import Console

from ha_ingestor.importer.progress import BarProgress, LogProgress, progress_for


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_bar_and_a_pipe_log_lines() -> None:
    assert isinstance(progress_for(_Tty()), BarProgress)
    assert isinstance(progress_for(io.StringIO()), LogProgress)


def test_log_lines_carry_rate_and_eta() -> None:
    now = [0.0]
    progress = LogProgress(clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs, progress:
        progress.begin("states", 100.0)
        now[0] = 1.0
        progress.advance(10.0, 500)  # too soon for a line
        now[0] = 6.0
        progress.advance(40.0, 1500)
        progress.end()
    assert [e["event"] for e in logs] == ["import progress", "import phase done"]
    first = logs[0]
    assert first["phase"] == "states"
    assert first["percent"] == 50.0
    assert first["rows"] == 2000
    assert first["rows_per_s"] == round(2000 / 6)
    assert first["eta_s"] == 6.0
    assert logs[1]["percent"] == 100.0
    assert logs[1]["eta_s"] == 0.0


def test_bar_shows_rows_and_log_records_go_above_it() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, color_system=None)
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    try:
        progress = BarProgress(console)
        with progress:
            progress.begin("statistics hour", 10.0)
            progress.advance(5.0, 1234)
            logging.getLogger("test").warning("a record during the bar")
            progress.end()
        assert handler.stream is not None
        assert "a record during the bar" not in handler.stream.getvalue()
    finally:
        root.removeHandler(handler)
    text = out.getvalue()
    assert "statistics hour" in text
    assert "1,234 rows" in text
    assert "a record during the bar" in text
    assert handler.stream.getvalue() == ""  # restored afterwards, nothing else written
