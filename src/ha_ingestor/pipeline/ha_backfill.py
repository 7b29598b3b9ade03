"""Filling a gap in the event stream from Home Assistant's recorder.

While the ingestor is not connected (Home Assistant restarting, a network blip, the ingestor
itself stopped) state changes still reach Home Assistant's recorder. After reconnecting and
subscribing, :class:`HistoryBackfill` reads them back with ``history/history_during_period``
(``significant_changes_only`` false, full attributes, the state at the start included) and
stores each row as the very ``ha_state`` point the live event would have produced: same series,
same timestamp (HA's ``last_updated`` to the microsecond). Where a back-filled point overlaps
one that was stored live, InfluxDB keeps one point.

What history cannot give back:
- the ``context_*`` fields (history has no context) and attributes the recorder does not keep
  (``supported_features``, ``attribution``, an integration's unrecorded attributes);
- any event other than ``state_changed`` (service calls, automation runs, ...);
- entities the recorder excludes, and anything older than the recorder keeps or than
  ``HA_INGESTOR_HA_BACKFILL_MAX_HOURS``.

The recorder writes in the background (every ``commit_interval`` seconds, 5 by default), so
the states of the last moments before the subscription may not be queryable yet. The gap ends
where the live stream begins — at the first state change received after subscribing — and
:meth:`HistoryBackfill.wait_for_recorder` waits until that first live change is in history:
the recorder commits in order, so everything before it is then committed too. A recorder
that takes longer (busy after a restart, migrating its database) gets the gap read at once
and then read again once it has caught up; the points of both readings collapse into one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from ha_ingestor.line_protocol import encode_point
from ha_ingestor.pipeline.buffer import Buffer
from ha_ingestor.pipeline.ha_events import Mapper, epoch_to_ns, format_time_ns, parse_time_ns
from ha_ingestor.record import Point
from ha_ingestor.telemetry import Telemetry

HISTORY = "history/history_during_period"
ENTITY_BATCH = 100  # entity ids per history request
WINDOW_NS = 3600 * 1_000_000_000  # one history request spans at most an hour
_PROBE_ENTITIES = 20


class Call(Protocol):
    """Sends one WebSocket command and returns its result (raises on an error answer)."""

    def __call__(self, command: str, **payload: Any) -> Awaitable[Any]: ...


class LiveProbe:
    """The first state changes received live after subscribing: the first one's time is
    where the gap ends; any of them showing up in history proves the recorder has committed
    everything before it. Fed by the socket reader, so it must stay cheap."""

    __slots__ = ("entity_ids", "first_ns")

    def __init__(self) -> None:
        self.first_ns: int | None = None
        self.entity_ids: dict[str, None] = {}  # insertion-ordered set

    def saw(self, entity_id: str, time_fired: str) -> None:
        if self.first_ns is None:
            self.first_ns = parse_time_ns(time_fired)
        if len(self.entity_ids) < _PROBE_ENTITIES:
            self.entity_ids[entity_id] = None


def history_points(
    mapper: Mapper, entity_id: str, rows: Iterable[Mapping[str, Any]], start_ns: int
) -> Iterator[Point]:
    """The points for one entity's history rows, in order.

    With ``include_start_time_state`` the first row may be the recorder's state *at*
    ``start_ns`` (its ``lu`` is the start time itself): it is not a change, only the previous
    state of the first real row. Home Assistant 2026.11 may also return the real row whose
    ``lu`` is exactly ``start_ns`` after it — the change the gap starts with, already stored:
    no row at or before ``start_ns`` becomes a point.
    """
    start_ns = start_ns // 1000 * 1000
    previous: Mapping[str, Any] | None = None
    for row in rows:
        if epoch_to_ns(float(row["lu"])) <= start_ns:
            previous = row
            continue
        point = mapper.history_point(entity_id, row, previous)
        previous = row
        if point is not None:
            yield point


class HistoryBackfill:
    """Reads a gap back from the recorder and hands its points to the buffer."""

    def __init__(
        self,
        call: Call,
        mapper: Mapper,
        buffer: Buffer,
        telemetry: Telemetry,
        *,
        max_hours: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._call = call
        self._mapper = mapper
        self._buffer = buffer
        self._telemetry = telemetry
        self._max_hours = max_hours
        self._clock = clock

    async def wait_for_recorder(
        self, probe: LiveProbe, max_wait: float, max_delay: float = 1.0
    ) -> bool:
        """Wait until the recorder has committed the first live state change (and so the
        whole gap before it), asking every ``max_delay`` s at most. False after ``max_wait`` s
        without that proof — no live change arrived, or only ones of entities the recorder
        excludes."""
        deadline = self._clock() + max_wait
        delay = 0.1
        while True:
            if probe.first_ns is not None and probe.entity_ids:
                found = await self._call(
                    HISTORY,
                    start_time=format_time_ns(probe.first_ns - 1000),
                    entity_ids=list(probe.entity_ids),
                    include_start_time_state=False,
                    significant_changes_only=False,
                    minimal_response=True,
                    no_attributes=True,
                )
                if isinstance(found, dict) and any(found.values()):
                    return True
            if self._clock() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)

    async def run(self, since_ns: int, until_ns: int | None, entity_ids: Iterable[str]) -> int:
        """Store the state changes after ``since_ns`` and before ``until_ns`` (None: up to
        now) of the current entities plus ``entity_ids``; return once they are durable.
        Returns the number of points (the caller counts them: a gap read twice is one gap)."""
        telemetry = self._telemetry
        now_ns = int(self._clock() * 1e9)
        oldest_ns = now_ns - int(self._max_hours * 3600e9)
        start_ns = since_ns // 1000 * 1000
        if start_ns < oldest_ns:
            telemetry.log.warning(
                "backfill gap capped",
                since=format_time_ns(start_ns),
                cap_hours=self._max_hours,
            )
            start_ns = oldest_ns // 1000 * 1000
        end_ns = until_ns if until_ns is not None else now_ns
        if end_ns <= start_ns:
            return 0
        states = await self._call("get_states")
        wanted = {str(s["entity_id"]) for s in states or ()} | set(entity_ids)
        allows = self._mapper.entity_filter.allows
        entities = sorted(e for e in wanted if allows(e))
        count = 0
        durable: list[asyncio.Future[None]] = []
        window_start = start_ns
        while window_start < end_ns:
            window_end = min(window_start + WINDOW_NS, end_ns)
            last_window = window_end == end_ns
            for i in range(0, len(entities), ENTITY_BATCH):
                payload: dict[str, Any] = {
                    "start_time": format_time_ns(window_start),
                    "entity_ids": entities[i : i + ENTITY_BATCH],
                    "include_start_time_state": True,
                    "significant_changes_only": False,
                    "minimal_response": False,
                    "no_attributes": False,
                }
                # Both bounds are exclusive in the recorder's query: an inner window ends 1 µs
                # after its end so a row exactly on the boundary is read once. The gap itself
                # ends before the first live change; without one it is open (up to now). The
                # recorder compares raw floats: a row whose float lies just below the
                # microsecond it is stored at passes its end bound, so _store drops it.
                if not last_window:
                    payload["end_time"] = format_time_ns(window_end + 1000)
                elif until_ns is not None:
                    payload["end_time"] = format_time_ns(until_ns)
                history = await self._call(HISTORY, **payload)
                before = until_ns if last_window else None
                count += await self._store(history or {}, window_start, before, durable)
            window_start = window_end
        # Durable before the caller moves the checkpoint past the gap.
        await asyncio.gather(*durable)
        telemetry.log.info(
            "backfill done",
            since=format_time_ns(start_ns),
            until=format_time_ns(end_ns) if until_ns is not None else "now",
            entities=len(entities),
            states=count,
        )
        return count

    async def _store(
        self,
        history: Mapping[str, list[Mapping[str, Any]]],
        start_ns: int,
        before_ns: int | None,
        durable: list[asyncio.Future[None]],
    ) -> int:
        """Buffer the points of ``history`` after ``start_ns`` and before ``before_ns`` (the
        first live change: that one and what follows are stored live)."""
        buffer = self._buffer
        count = 0
        last: asyncio.Future[None] | None = None
        for entity_id, rows in history.items():
            for point in history_points(self._mapper, entity_id, rows, start_ns):
                if before_ns is not None and point.time_ns >= before_ns:
                    continue
                try:
                    line = encode_point(point)
                except ValueError as exc:
                    self._telemetry.dropped("unencodable", intentional=False)
                    self._telemetry.warn_throttled(
                        "homeassistant-unencodable",
                        60,
                        "point cannot be encoded",
                        entity_id=entity_id,
                        error=str(exc),
                    )
                    continue
                if buffer.full():
                    await buffer.wait_for_room()
                accepted = buffer.add(line)
                if accepted is not last:
                    durable.append(accepted)
                    last = accepted
                count += 1
        return count
