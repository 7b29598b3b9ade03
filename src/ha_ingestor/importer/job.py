"""The import itself: the recorder's states and long-term statistics, window by window, into a
sink (the spool, or a counter for ``--dry-run``), with a checkpoint per finished window.

States come from ``history/history_during_period`` (every change, attributes included), one
command in flight, in windows that grow while Home Assistant answers fast and shrink when it
does not. Each row becomes the point the live event made (:func:`history_points`, the
back-fill's own mapping): same series, same µs. The row before a window's first change (its
``previous_state``) is carried over from the window before; the first window of a run asks
for the state at its start for that purpose and drops it.

Statistics come from ``recorder/statistics_during_period`` per period (``hour``,
``5minute``), asked for in the unit the recorder stores them in (``units`` per unit class),
statistics of one unit class and unit together.

Resuming: after each window the checkpoint ``import.<phase>`` records how far the import got
(stored with the spool commit that holds the window's points, so never ahead of them), and
``import.active`` names the import under way until it has finished. A rerun with the same
``--since`` and ``--entities`` continues an unfinished import where each phase stopped, with
the span it had (finished phases are skipped); after a finished import, a rerun imports again
from the start — idempotent, the same points overwrite themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Protocol

import orjson

from ha_ingestor.importer.options import ImportOptionError, ImportOptions
from ha_ingestor.importer.progress import ImportProgress
from ha_ingestor.line_protocol import encode_fields, series_key
from ha_ingestor.pipeline.buffer import Buffer, Checkpoints
from ha_ingestor.pipeline.ha_backfill import HISTORY, Call, history_points
from ha_ingestor.pipeline.ha_events import Mapper, epoch_to_ns, format_time_ns, parse_time_ns
from ha_ingestor.pipeline.ha_statistics import PERIODS, Statistic, StatisticsMapper
from ha_ingestor.record import Point
from ha_ingestor.telemetry import Telemetry

STATISTICS_DURING_PERIOD = "recorder/statistics_during_period"
LIST_STATISTIC_IDS = "recorder/list_statistic_ids"
STATES_PHASE = "states"
ACTIVE_KEY = "import.active"
ENTITY_BATCH = 25  # entity ids per history request: fewer rows per answer, flat memory
STATISTIC_BATCH = 10  # statistic ids per statistics request: about 7,200 rows per answer
_MINUTE_NS = 60 * 1_000_000_000
_HOUR_NS = 60 * _MINUTE_NS
_DAY_NS = 24 * _HOUR_NS
MIN_WINDOW_NS = 5 * _MINUTE_NS
MAX_WINDOW_NS = 7 * _DAY_NS
_FIRST_WINDOW_NS = _HOUR_NS
#: When every answer of a window is this fast and this small the next window doubles; when one is
#: slower or larger the window shrinks (to fit the row bound). The row bound keeps an answer at
#: about 2,000 rows, under 3 MB decoded (attributes included): the working set a history of a few
#: thousand changes already reaches, so peak memory does not grow with the history (measured by
#: bench.history_import; a tighter bound saved little more and cost throughput).
_FAST_S, _SLOW_S = 1.0, 4.0
_SMALL_ROWS, _LARGE_ROWS = 1_000, 4_000
#: Unwritten lines above which reading pauses until the writer has caught up to half of it.
MAX_UNWRITTEN_LINES = 8_000
#: Statistics windows: about 720 rows per statistic and request.
STATISTICS_WINDOW_NS = {"hour": 30 * _DAY_NS, "5minute": 2 * _DAY_NS + 12 * _HOUR_NS}
STATISTIC_TYPES = ["mean", "min", "max", "sum", "state"]


def checkpoint_key(phase: str) -> str:
    return f"import.{phase}"


def statistics_phase(period: str) -> str:
    return f"statistics.{period}"


PHASES = (STATES_PHASE, *(statistics_phase(p) for p in PERIODS))


@dataclass(slots=True)
class Span:
    """One phase's part of an import, as stored in its checkpoint."""

    identity: str
    since_ns: int
    until_ns: int
    done_ns: int

    @property
    def finished(self) -> bool:
        return self.done_ns >= self.until_ns

    def dumps(self) -> str:
        return orjson.dumps(
            {
                "import": self.identity,
                "since": format_time_ns(self.since_ns),
                "until": format_time_ns(self.until_ns),
                "done": format_time_ns(self.done_ns),
            }
        ).decode()

    @classmethod
    def loads(cls, text: str | None) -> Span | None:
        if not text:
            return None
        try:
            data = orjson.loads(text)
            return cls(
                str(data["import"]),
                parse_time_ns(data["since"]),
                parse_time_ns(data["until"]),
                parse_time_ns(data["done"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass
class Counts:
    """Rows read and points stored, per entity or statistic."""

    per_key: dict[str, int] = field(default_factory=dict)
    points: int = 0
    unencodable: int = 0


class Sink(Protocol):
    """Where the import's points go: the spool, or nowhere but a count (dry run)."""

    counts: Counts

    async def put(self, key: str, point: Point) -> None: ...

    async def durable(self) -> None: ...


class CountingSink:
    """``--dry-run``: counts what would be stored."""

    def __init__(self) -> None:
        self.counts = Counts()

    async def put(self, key: str, point: Point) -> None:
        counts = self.counts
        counts.per_key[key] = counts.per_key.get(key, 0) + 1
        counts.points += 1

    async def durable(self) -> None:
        return None


class BufferSink:
    """Encodes into a buffer (spool) like the live source, with its back-pressure; an
    unencodable point is counted, logged and left out — the rest goes on.

    An import reads far faster than InfluxDB may take it, or InfluxDB may be down: above
    ``max_unwritten`` lines not yet written, reading pauses until the writer has brought them
    down to half of that. Memory stays flat however long the history, and the spool's size cap
    (and its overflow policy) is never reached by the import itself."""

    def __init__(
        self, buffer: Buffer, telemetry: Telemetry, max_unwritten: int = MAX_UNWRITTEN_LINES
    ) -> None:
        self.counts = Counts()
        self._buffer = buffer
        self._telemetry = telemetry
        self._max_unwritten = max_unwritten
        self._last: asyncio.Future[None] | None = None
        self._pending: list[asyncio.Future[None]] = []
        # Per entity or statistic: its last tags and their escaped series key (tags rarely
        # change between an entity's rows, and escaping them is half of encoding a point).
        self._series: dict[str, tuple[str, dict[str, str], str]] = {}

    def _encode(self, key: str, point: Point) -> str:
        cached = self._series.get(key)
        if cached is None or cached[0] != point.measurement or cached[1] != point.tags:
            if len(self._series) > 100_000:
                self._series.clear()
            cached = (point.measurement, point.tags, series_key(point.measurement, point.tags))
            self._series[key] = cached
        fields = encode_fields(point.fields)
        if not fields:
            raise ValueError(f"point of {point.measurement!r} has no field that can be written")
        return f"{cached[2]} {fields} {point.time_ns}"

    async def _wait_for_writer(self) -> None:
        high = self._max_unwritten
        if self._buffer.depth()[0] < high:
            return
        self._telemetry.warn_throttled(
            "import-waiting", 30, "import waiting for InfluxDB", unwritten_lines=high
        )
        # Polling: the buffer has no event for "drained below a size".
        while self._buffer.depth()[0] > high // 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def put(self, key: str, point: Point) -> None:
        try:
            line = self._encode(key, point)
        except ValueError as exc:
            self.counts.unencodable += 1
            self._telemetry.dropped("unencodable", intentional=False)
            self._telemetry.warn_throttled(
                "import-unencodable", 60, "point cannot be encoded", series=key, error=str(exc)
            )
            return
        buffer = self._buffer
        if buffer.full():
            await buffer.wait_for_room()
            await self._wait_for_writer()
        accepted = buffer.add(line)
        if self.counts.points % 500 == 0:
            await self._wait_for_writer()
        if accepted is not self._last:
            self._last = accepted
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(accepted)
        counts = self.counts
        counts.per_key[key] = counts.per_key.get(key, 0) + 1
        counts.points += 1

    async def durable(self) -> None:
        """Everything put so far is in the spool."""
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)


@dataclass
class Summary:
    entities: int = 0
    states: int = 0
    statistic_ids: int = 0
    statistics: int = 0
    unencodable: int = 0
    resumed: list[str] = field(default_factory=list)
    states_until_ns: int | None = None


def batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def check_globs(globs: Sequence[str], names: Sequence[str]) -> None:
    """Every ``--entities`` glob must match something: a typo must not import nothing."""
    for glob in globs:
        if not any(fnmatchcase(name, glob) for name in names):
            raise ImportOptionError(
                "--entities",
                f"{glob!r} matches no entity and no statistic in Home Assistant's recorder",
            )


class Importer:
    def __init__(
        self,
        call: Call,
        mapper: Mapper,
        statistics_mapper: StatisticsMapper,
        sink: Sink,
        checkpoints: Checkpoints | None,
        progress: ImportProgress,
        telemetry: Telemetry,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._call = call
        self._mapper = mapper
        self._statistics_mapper = statistics_mapper
        self._sink = sink
        self._checkpoints = checkpoints  # None: a dry run, which neither resumes nor records
        self._progress = progress
        self._log = telemetry.log
        self._clock = clock
        self._resuming = False
        self.summary = Summary()

    # --- planning ----------------------------------------------------------------------------------
    async def entity_ids(self) -> list[str]:
        """Every entity Home Assistant knows of now (states and entity registry)."""
        states = await self._call("get_states")
        names = {str(s["entity_id"]) for s in states or ()}
        registry = await self._call("config/entity_registry/list")
        names |= {str(e["entity_id"]) for e in registry or ()}
        return sorted(names)

    async def statistics(self) -> list[Statistic]:
        listing = await self._call(LIST_STATISTIC_IDS)
        return sorted(
            (Statistic.from_listing(item) for item in listing or ()),
            key=lambda s: s.statistic_id,
        )

    def _selected(self, names: Sequence[str], globs: Sequence[str]) -> list[str]:
        allows = self._mapper.entity_filter.allows
        return [
            name
            for name in names
            if allows(name) and (not globs or any(fnmatchcase(name, g) for g in globs))
        ]

    def _span(self, phase: str, options: ImportOptions, until_ns: int) -> Span:
        """The phase's span: where an interrupted import of the same options stopped, or
        a fresh one."""
        if self._resuming and self._checkpoints is not None:
            stored = Span.loads(self._checkpoints.load(checkpoint_key(phase)))
            if stored is not None and stored.identity == options.identity:
                self.summary.resumed.append(phase)
                self._log.info(
                    "import resumed",
                    phase=phase,
                    since=format_time_ns(stored.since_ns),
                    until=format_time_ns(stored.until_ns),
                    done=format_time_ns(stored.done_ns),
                )
                return stored
        return Span(options.identity, options.since_ns, until_ns, options.since_ns)

    async def _record(self, phase: str, span: Span) -> None:
        if self._checkpoints is not None:
            await self._checkpoints.save(checkpoint_key(phase), span.dumps())

    # --- running -----------------------------------------------------------------------------------
    async def run(
        self, options: ImportOptions, states_until_ns: int, statistics_until_ns: int
    ) -> Summary:
        summary = self.summary
        checkpoints = self._checkpoints
        if checkpoints is not None:
            # Set while an import runs, cleared when it has finished: a rerun of the same
            # options resumes each phase; after a finished import it starts over.
            self._resuming = checkpoints.load(ACTIVE_KEY) == options.identity
            if not self._resuming:  # what an earlier import recorded is no place to resume
                for phase in PHASES:
                    await checkpoints.save(checkpoint_key(phase), "")
            await checkpoints.save(ACTIVE_KEY, options.identity)
        entities: list[str] = []
        statistics: list[Statistic] = []
        if options.states:
            entities = self._selected(await self.entity_ids(), options.entity_globs)
        if options.statistics:
            listed = await self.statistics()
            wanted = set(self._selected([s.statistic_id for s in listed], options.entity_globs))
            statistics = [s for s in listed if s.statistic_id in wanted]
        if options.entity_globs:
            check_globs(options.entity_globs, [*entities, *(s.statistic_id for s in statistics)])
        summary.entities, summary.statistic_ids = len(entities), len(statistics)
        if options.states and entities:
            span = self._span(STATES_PHASE, options, states_until_ns)
            summary.states_until_ns = span.until_ns
            await self._states(entities, span)
        if options.statistics and statistics:
            for period in PERIODS:
                phase = statistics_phase(period)
                span = self._span(phase, options, statistics_until_ns)
                await self._statistics(statistics, period, phase, span)
        await self._sink.durable()
        if checkpoints is not None:
            await checkpoints.save(ACTIVE_KEY, "")
        summary.unencodable = self._sink.counts.unencodable
        return summary

    async def _states(self, entities: list[str], span: Span) -> None:
        """Window after window; the next request goes out as soon as an answer is in, so
        Home Assistant prepares it while this one is mapped (still one command in flight)."""
        progress = self._progress
        progress.begin("states", (span.until_ns - span.done_ns) / 1e9)
        if span.done_ns >= span.until_ns:
            progress.end()
            return
        previous: dict[str, Mapping[str, Any]] = {}
        window = _FIRST_WINDOW_NS
        start = span.done_ns
        end = min(start + window, span.until_ns)
        # The first window of a run asks for the state at its start: the previous state of
        # its first change. Later windows have it from the window before.
        payloads = _history_payloads(entities, start, end, first=True)
        index = 0
        fetch: asyncio.Task[tuple[Any, float]] | None = asyncio.create_task(
            self._ask(payloads[0]), name="import-history"
        )
        answers = _Answers(end)
        stored = 0
        try:
            while fetch is not None:
                history, seconds = await fetch
                history = history or {}
                payload = payloads[index]
                answers.note(history, seconds)
                index += 1
                window_done = index == len(payloads)
                next_payloads = payloads
                if not window_done:
                    fetch = asyncio.create_task(self._ask(payloads[index]), name="import-history")
                elif end < span.until_ns:
                    window = _next_window(
                        window, answers.slowest, answers.largest, end - max(answers.earliest, start)
                    )
                    next_end = min(end + window, span.until_ns)
                    next_payloads = _history_payloads(entities, end, next_end, first=False)
                    fetch = asyncio.create_task(self._ask(next_payloads[0]), name="import-history")
                else:
                    fetch = None
                count = await self._store_history(history, start, previous)
                stored += count
                self._log.debug("history window", rows=count, seconds=seconds, **payload)
                if window_done:
                    span.done_ns = end
                    await self._record(STATES_PHASE, span)
                    self.summary.states += stored
                    progress.advance((end - start) / 1e9, stored)
                    start, end = end, min(end + window, span.until_ns)
                    payloads, index = next_payloads, 0
                    answers, stored = _Answers(end), 0
        finally:
            if fetch is not None and not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
        progress.end()

    async def _ask(self, payload: dict[str, Any]) -> tuple[Any, float]:
        asked = self._clock()
        answer = await self._call(HISTORY, **payload)
        return answer, self._clock() - asked

    async def _store_history(
        self,
        history: Mapping[str, list[Mapping[str, Any]]],
        start_ns: int,
        previous: dict[str, Mapping[str, Any]],
    ) -> int:
        sink = self._sink
        mapper = self._mapper
        count = 0
        for entity_id, rows in history.items():
            if not rows:
                continue
            carried = previous.get(entity_id)
            # The row carried from the window before is at or before its start: the mapping
            # takes it as the first change's previous state, not as a change.
            sequence = [carried, *rows] if carried is not None else rows
            for point in history_points(mapper, entity_id, sequence, start_ns):
                await sink.put(entity_id, point)
                count += 1
            previous[entity_id] = rows[-1]
        return count

    async def _statistics(
        self, statistics: list[Statistic], period: str, phase: str, span: Span
    ) -> None:
        progress = self._progress
        progress.begin(f"statistics {period}", (span.until_ns - span.done_ns) / 1e9)
        by_id = {s.statistic_id: s for s in statistics}
        groups: dict[tuple[str | None, str | None], list[str]] = {}
        for statistic in statistics:
            groups.setdefault(statistic.units_key, []).append(statistic.statistic_id)
        window = STATISTICS_WINDOW_NS[period]
        mapper = self._statistics_mapper
        sink = self._sink
        while span.done_ns < span.until_ns:
            start = span.done_ns
            end = min(start + window, span.until_ns)
            rows = 0
            for (unit_class, unit), ids in groups.items():
                for batch in batches(ids, STATISTIC_BATCH):
                    payload: dict[str, Any] = {
                        "start_time": format_time_ns(start),
                        "end_time": format_time_ns(end),
                        "statistic_ids": batch,
                        "period": period,
                        "types": STATISTIC_TYPES,
                    }
                    if unit_class is not None and unit is not None:
                        payload["units"] = {unit_class: unit}  # no conversion: the stored unit
                    asked = self._clock()
                    answer = await self._call(STATISTICS_DURING_PERIOD, **payload)
                    self._log.debug("statistics window", seconds=self._clock() - asked, **payload)
                    for statistic_id, statistic_rows in (answer or {}).items():
                        known = by_id.get(statistic_id)
                        if known is None:
                            continue
                        for row in statistic_rows:
                            point = mapper.point(known, period, row)
                            if point is not None:
                                await sink.put(statistic_id, point)
                                rows += 1
            span.done_ns = end
            await self._record(phase, span)
            self.summary.statistics += rows
            progress.advance((end - start) / 1e9, rows)
        progress.end()


@dataclass(slots=True)
class _Answers:
    """What one window's answers tell about the next window: the slowest answer, the largest
    (rows), and the earliest row (before it, the window had none)."""

    earliest: int
    slowest: float = 0.0
    largest: int = 0

    def note(self, history: Mapping[str, list[Mapping[str, Any]]], seconds: float) -> None:
        self.slowest = max(self.slowest, seconds)
        self.largest = max(self.largest, sum(len(rows) for rows in history.values()))
        for rows in history.values():
            if rows:
                self.earliest = min(self.earliest, epoch_to_ns(float(rows[0]["lu"])))


def _history_payloads(
    entities: list[str], start_ns: int, end_ns: int, *, first: bool
) -> list[dict[str, Any]]:
    """The requests of one window, one per batch of entities. Both bounds are exclusive in the
    recorder's query: ending 1 µs after the window's end reads a row exactly on it once, in
    this window (the next one starts after it)."""
    return [
        {
            "start_time": format_time_ns(start_ns),
            "end_time": format_time_ns(end_ns + 1000),
            "entity_ids": batch,
            "include_start_time_state": first,
            "significant_changes_only": False,
            "minimal_response": False,
            "no_attributes": False,
        }
        for batch in batches(entities, ENTITY_BATCH)
    ]


def _next_window(window: int, seconds: float, rows: int, busy_ns: int) -> int:
    """The next window from the slowest and the largest answer of this one, and the part of
    it (``busy_ns``, from its first row to its end) that had rows: after a stretch without
    any, the rate of that part, not of the whole window, predicts the next answer's size."""
    if seconds > _SLOW_S:
        return max(window // 2, MIN_WINDOW_NS)
    if rows and busy_ns > 0:
        fits = busy_ns * _LARGE_ROWS // (2 * rows)  # about half the bound, at this rate
        if rows > _LARGE_ROWS or fits < window:
            return max(min(fits, window), MIN_WINDOW_NS)
        if seconds < _FAST_S and rows < _SMALL_ROWS:
            return max(min(window * 2, fits, MAX_WINDOW_NS), MIN_WINDOW_NS)
        return window
    if seconds < _FAST_S:
        return min(window * 2, MAX_WINDOW_NS)  # nothing there: cross it quickly
    return window
