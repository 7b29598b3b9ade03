"""Which lines of a refused or partly stored batch InfluxDB kept, and which it refused.

Each answer is settled from what the server says, in one round trip, where that is exact:

- InfluxDB 3 ``write_lp`` (``accept_partial``): every line is stored except those listed in
  ``data`` by ``line_number``. A listed line that hit a limit is kept to be retried; the others
  are refused for good.
- InfluxDB 3 ``/write`` and ``/api/v2/write``: nothing is stored, ``data`` names the first bad
  line. That line is refused; the others are sent again.
- InfluxDB 1.x and 2.x ``partial write: ... dropped=N``: the other lines are stored. A field
  type conflict names the field, its measurement and the refused type, which picks out the
  dropped lines; points beyond the retention period are the N oldest.

When an answer does not pick out exactly the lines it says were dropped, the writer bisects
the batch instead (lines are idempotent: a line sent twice lands on the same point).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ha_ingestor.line_protocol import field_type, parse_line
from ha_ingestor.sinks.influxdb import Outcome, WriteResult

__all__ = ["Settlement", "settle"]

_TYPE_CONFLICT = re.compile(
    r'input field "(?P<field>(?:[^"\\]|\\.)*)" on measurement "(?P<measurement>(?:[^"\\]|\\.)*)"'
    r" is type (?P<type>\w+)"
)
_RETENTION = "points beyond retention policy"


@dataclass(slots=True)
class Settlement:
    """``stored``: in InfluxDB now; ``refused``: (line, reason) for the dead-letter file;
    ``kept``: refused for a limit, to be retried; ``resend``: not stored, to be sent again."""

    stored: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    resend: list[str] = field(default_factory=list)


def settle(lines: list[str], result: WriteResult) -> Settlement | None:
    """What became of each line, or None when the answer does not say exactly."""
    if result.line_errors:
        return _by_line_number(lines, result)
    if result.dropped is not None and result.dropped > 0:
        dropped = _dropped_lines(lines, result.message, result.dropped)
        if dropped is None:
            return None
        reason = _reason(result.status, result.message)
        return Settlement(
            stored=[line for i, line in enumerate(lines) if i not in dropped],
            refused=[(lines[i], reason) for i in sorted(dropped)],
        )
    return None


def _by_line_number(lines: list[str], result: WriteResult) -> Settlement | None:
    settlement = Settlement()
    listed: dict[int, str] = {}
    kept: set[int] = set()
    for error in result.line_errors:
        index = error.line_number - 1
        if index >= len(lines) or not lines[index].startswith(error.original_line):
            return None  # numbered differently than sent: do not guess
        listed[index] = _reason(result.status, error.message)
        if error.is_limit:
            kept.add(index)
    partial = result.outcome == Outcome.PARTIAL  # the unlisted lines are stored
    for index, line in enumerate(lines):
        if index in kept:
            settlement.kept.append(line)
        elif index in listed:
            settlement.refused.append((line, listed[index]))
        elif partial:
            settlement.stored.append(line)
        else:
            settlement.resend.append(line)
    return settlement


def _dropped_lines(lines: list[str], message: str, dropped: int) -> set[int] | None:
    """Indices of the lines a 1.x/2.x partial write dropped, when the message pins them down."""
    try:
        # A line that does not parse is dropped too, but not counted in dropped=N (1.x).
        parsed = [parse_line(line) for line in lines]
    except ValueError:
        return None
    conflict = _TYPE_CONFLICT.search(message)
    if conflict is not None:
        name = conflict["field"].replace('\\"', '"')
        measurement = conflict["measurement"].replace('\\"', '"')
        found = {
            index
            for index, point in enumerate(parsed)
            if point.measurement == measurement
            and name in point.fields
            and field_type(point.fields[name]) == conflict["type"]
        }
        return found if len(found) == dropped else None
    if _RETENTION in message:
        if any(point.time_ns is None for point in parsed):
            return None
        times = sorted((point.time_ns or 0, index) for index, point in enumerate(parsed))
        if len(times) > dropped and times[dropped - 1][0] == times[dropped][0]:
            return None  # the cut-off falls between equal times
        return {index for _, index in times[:dropped]}
    return None


def _reason(status: int | None, message: str) -> str:
    return f"HTTP {status}: {message}" if status is not None else message
