"""What ``ha-ingestor import`` was asked to do: its options, parsed and checked up front."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from ha_ingestor.pipeline.ha_events import parse_time_ns

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class ImportOptionError(Exception):
    """An option of the import is invalid; ``option`` names it (``--since``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


def parse_moment(option: str, text: str, now_ns: int) -> int:
    """``30d``/``12h``/``90m`` (before now) or an ISO 8601 time → ns since the epoch. A time
    without a UTC offset is this machine's local time, as ``date`` shows it."""
    text = text.strip()
    duration = _DURATION.match(text)
    if duration:
        seconds = float(duration.group(1)) * _UNIT_SECONDS[duration.group(2)]
        return now_ns - int(seconds * 1e9) // 1000 * 1000
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ImportOptionError(
            option,
            f"{text!r} is neither an ISO 8601 time (2026-11-01T00:00:00+01:00) nor a duration "
            "such as 30d, 12h or 90m",
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time
    return parse_time_ns(moment.astimezone(UTC).isoformat())


@dataclass(frozen=True, slots=True)
class ImportOptions:
    """``since_text`` is the ``--since`` option as given: an interrupted import is resumed by
    a rerun with the same options (``30d`` stays the same import, not one a day later)."""

    since_text: str
    since_ns: int
    until_ns: int | None  # None: the live checkpoint, else now
    entity_globs: tuple[str, ...]
    states: bool
    statistics: bool
    dry_run: bool

    @property
    def identity(self) -> str:
        """What makes two invocations the same import (for resuming)."""
        return f"{self.since_text}|{','.join(self.entity_globs)}"


def build_options(
    *,
    since: str,
    until: str | None,
    entities: str | None,
    states: bool,
    statistics: bool,
    dry_run: bool,
    now_ns: int,
) -> ImportOptions:
    since_ns = parse_moment("--since", since, now_ns)
    if since_ns >= now_ns:
        raise ImportOptionError("--since", f"{since!r} is in the future: nothing is recorded yet")
    until_ns = parse_moment("--until", until, now_ns) if until is not None else None
    if until_ns is not None and until_ns <= since_ns:
        raise ImportOptionError("--until", f"{until!r} is not after --since {since!r}")
    globs = tuple(g.strip() for g in (entities or "").split(",") if g.strip())
    if entities is not None and not globs:
        raise ImportOptionError("--entities", "is empty: give comma-separated globs (sensor.*)")
    if not states and not statistics:
        raise ImportOptionError(
            "--no-states/--no-statistics", "both given: there is nothing left to import"
        )
    return ImportOptions(
        since_text=since.strip(),
        since_ns=since_ns,
        until_ns=until_ns,
        entity_globs=globs,
        states=states,
        statistics=statistics,
        dry_run=dry_run,
    )
