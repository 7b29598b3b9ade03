"""The Home Assistant source: every event on the bus, through the WebSocket API.

The protocol — connect, authenticate, commands, the event stream, the ping — is
:class:`~ha_ingestor.sources.ha_client.HomeAssistantClient`; this module is the ingest loop
around it. Per connection: read the entity, device, area, floor and label
registries, subscribe to events, then back-fill the gap since the last stored event from the
recorder's history (:mod:`ha_ingestor.pipeline.ha_backfill`).

So that Home Assistant never sees a slow consumer, the client only decodes a message and hands
its events to :meth:`HomeAssistantSource._on_events`, which appends them to an unbounded deque
(its depth is ``ha_ingestor_queue_depth{queue="homeassistant"}``); the *processor* task maps
events to points, encodes and buffers them, and waits when the buffer is full — only it feels
back-pressure. At a trickle the client reads the socket at most every ``_READ_COALESCING``
seconds, so the events of that time cost one wake-up and, together, one spool commit, not one
each. Nothing waits on that but the point's arrival in InfluxDB (which the writer's flush
interval delays longer): every event carries its own time, and commands are answered at once.

Errors:
- transport errors (refused, closed, no pong, malformed frame) → ``RECONNECTING``, capped
  jittered exponential backoff, reconnect, resubscribe, back-fill;
- :class:`AuthInvalidError` (``auth_invalid``), :class:`NotAllowedError` (a non-admin
  token asked for all events) and :class:`EventTypeRefusedError` (Home Assistant refuses to
  subscribe to an event named in ``HA_INGESTOR_HA_EVENT_TYPES``, e.g. ``state_reported``)
  → ``FAILED`` with an actionable message and no more attempts: repeated bad logins get an
  IP banned, and only the operator can fix any of them;
- :class:`CommandError` — Home Assistant answered a command with an error.

Instance: the ``instance`` tag of every point (MQTT's too) is decided once, before the first
point, by :func:`decide_instance` — ``HA_INGESTOR_INSTANCE``, else the one decided on an earlier
run (kept with the checkpoints), else Home Assistant's location name, else the host name — and
never changes while running, so no series is split when Home Assistant connects.

Checkpoint: ``homeassistant.last_event`` holds the time of the newest event whose point is
durable, held back to the start of a gap until that gap's back-fill is durable too; a restart
of the ingestor back-fills from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ha_ingestor.backoff import Backoff
from ha_ingestor.config import Settings
from ha_ingestor.errors import describe
from ha_ingestor.line_protocol import encode_point
from ha_ingestor.pipeline.buffer import Buffer, Checkpoints
from ha_ingestor.pipeline.columns import ColumnBudget
from ha_ingestor.pipeline.ha_backfill import Call, HistoryBackfill, LiveProbe
from ha_ingestor.pipeline.ha_events import (
    EntityFilter,
    EntityInfo,
    Mapper,
    format_time_ns,
    parse_time_ns,
)
from ha_ingestor.sources.ha_client import (
    AuthInvalidError,
    CommandError,
    Events,
    HomeAssistantClient,
)
from ha_ingestor.sources.ha_registry import REGISTRY_EVENTS, Registries
from ha_ingestor.telemetry import ConnState, Telemetry
from ha_ingestor.tls import ha_tls_context

TARGET = "homeassistant"
CHECKPOINT_KEY = "homeassistant.last_event"
INSTANCE_KEY = "homeassistant.instance"
#: At the very first subscription, the span before it that is back-filled too.
FIRST_BACKFILL_NS = 5_000_000_000
_INSTANCE_WAIT = 10.0  # at the very first start: how long to try for the location name
_CALL_TIMEOUT = 60.0  # a command's answer (get_states and history can be large and slow)
_STABLE_AFTER = 30.0  # a connection up this long resets the backoff
_REGISTRY_DEBOUNCE = 0.5  # registry events come in bursts: re-fetch once per burst
#: How long a gap read without the recorder's confirmation waits for it to read the gap again.
_RECORDER_RECHECK = 600.0
_MAX_KNOWN_ENTITIES = 100_000
_READ_COALESCING = 0.5  # at a trickle: the socket is read at most this often (seconds)
_PROCESS_AT_ONCE = 256  # in a backlog: the events handled between yields to the loop
_KEEP_ON_SHUTDOWN_TIMEOUT = 2.0  # seconds to finish writing rejected events at shutdown


class RejectedEvents(Protocol):
    """Where events that cannot become a point are kept (the dead-letter file)."""

    async def add_event(self, event: Mapping[str, Any], reason: str) -> None: ...


class NotAllowedError(Exception):
    """The token may not do what the source needs (a non-admin user's token)."""


class EventTypeRefusedError(Exception):
    """Home Assistant refuses to subscribe to an event type the configuration names."""


async def subscribe_events(call: Call, event_types: Sequence[str]) -> None:
    """Subscribe to ``event_types`` (all events when empty), as the source does, and ``check``
    to test a token. Raises :class:`NotAllowedError` for a token that may not,
    :class:`EventTypeRefusedError` for an event type Home Assistant refuses."""
    try:
        for event_type in event_types:
            try:
                await call("subscribe_events", event_type=event_type)
            except CommandError as exc:
                if exc.code == "unauthorized":
                    raise
                raise EventTypeRefusedError(
                    f"Home Assistant refused to subscribe to {event_type!r}, named in "
                    f"HA_INGESTOR_HA_EVENT_TYPES ({exc.code}: {exc}). Remove it from "
                    "HA_INGESTOR_HA_EVENT_TYPES and restart."
                ) from None
        if not event_types:
            await call("subscribe_events")
    except CommandError as exc:
        if exc.code == "unauthorized":
            raise NotAllowedError(
                "Home Assistant refused to let this token subscribe to "
                f"{'these events' if event_types else 'all events'} "
                "(unauthorized): only an administrator's token may. Use a long-lived "
                "access token of an administrator, or set HA_INGESTOR_HA_EVENT_TYPES to "
                "events any user may subscribe to (e.g. state_changed)."
            ) from None
        raise


def event_mapper(
    settings: Settings,
    instance: str,
    entity_info: Callable[[str], EntityInfo],
    columns: ColumnBudget | None = None,
) -> Mapper:
    """The event → point mapping the settings ask for: live, back-filled and imported points
    all come from one, so they are the same points."""
    return Mapper(
        instance=instance,
        static_tags=settings.tags,
        exclude_attributes=frozenset(settings.ha_exclude_attributes),
        entity_filter=EntityFilter(settings.ha_include_entities, settings.ha_exclude_entities),
        exclude_event_types=frozenset(settings.ha_exclude_event_types),
        entity_info=entity_info,
        state_fields_always=frozenset(settings.ha_state_fields_always),
        columns=columns,
    )


class HomeAssistantSource:
    def __init__(
        self,
        settings: Settings,
        buffer: Buffer,
        telemetry: Telemetry,
        checkpoints: Checkpoints,
        instance: str | None = None,
        columns: ColumnBudget | None = None,
        dead_letters: RejectedEvents | None = None,
    ) -> None:
        """``dead_letters`` keeps the events that cannot become a point (None: they are only
        counted)."""
        if settings.ha_url is None or settings.ha_token is None:
            raise ValueError("HA_INGESTOR_HA_URL and HA_INGESTOR_HA_TOKEN are both needed")
        self._settings = settings
        self._buffer = buffer
        self._telemetry = telemetry
        self._checkpoints = checkpoints
        self._dead_letters = dead_letters
        self._keeping: set[asyncio.Task[None]] = set()  # rejected events being written
        self._registries = Registries()
        self._mapper = event_mapper(
            settings,
            instance or settings.instance or socket.gethostname(),
            self._registries.info,
            columns,
        )
        self._backfill = HistoryBackfill(
            self._call,
            self._mapper,
            buffer,
            telemetry,
            max_hours=settings.ha_backfill_max_hours,
        )
        self._wants_states = (
            not settings.ha_event_types or "state_changed" in settings.ha_event_types
        ) and "state_changed" not in settings.ha_exclude_event_types
        # Every excluded event type, state_changed included (the mapper only sees the others).
        self._excluded_event_types = frozenset(settings.ha_exclude_event_types)
        self._received = telemetry.metrics.events_received.labels(TARGET)
        self._queue_depth = telemetry.metrics.queue_depth.labels(TARGET)
        # reader → processor
        self._events: deque[dict[str, Any]] = deque()
        self._events_ready = asyncio.Event()
        self._last_received: str | None = None  # time_fired of the newest event read
        self._probe: LiveProbe | None = None  # while a gap waits for its back-fill
        self._max_held = settings.ha_max_held_events
        self._shed_from_ns: int | None = None  # first event not held (past the bound)
        # the current connection
        self._client: HomeAssistantClient | None = None
        self._connection_tasks: set[asyncio.Task[None]] = set()
        self._dirty_registries: set[str] = set()
        self._registries_dirty = asyncio.Event()
        # checkpoint
        saved = checkpoints.load(CHECKPOINT_KEY)
        self._saved: str | None = saved
        self._durable_ns: int | None = parse_time_ns(saved) if saved else None
        self._hold_ns: int | None = self._durable_ns  # start of a gap not yet back-filled
        self._group_future: asyncio.Future[None] | None = None
        self._group_latest = [0]
        self._known_entities: set[str] = set()
        #: Connection attempts since start (tests use it to prove there is no retry storm).
        self.connection_attempts = 0

    @property
    def mapper(self) -> Mapper:
        return self._mapper

    @property
    def registries(self) -> Registries:
        """Home Assistant's registries as this source keeps them current (the MQTT side
        names discovered entities from them)."""
        return self._registries

    # --- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, reconnect and process until cancelled."""
        telemetry = self._telemetry
        telemetry.set_state(TARGET, ConnState.CONNECTING)
        backoff = Backoff(base=1.0, cap=60.0)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._process_loop(), name="homeassistant-process")
                group.create_task(self._checkpoint_loop(), name="homeassistant-checkpoint")
                while True:
                    loop = asyncio.get_running_loop()
                    began = loop.time()
                    try:
                        await self._connection()
                    except (AuthInvalidError, NotAllowedError, EventTypeRefusedError) as exc:
                        telemetry.set_state(TARGET, ConnState.FAILED, error=str(exc))
                        await asyncio.Event().wait()  # stay up, not ready, until stopped
                    except (
                        OSError,  # refused, TLS, closed, a WebSocket protocol error
                        TimeoutError,
                        ValueError,  # a malformed frame
                        CommandError,
                    ) as exc:
                        telemetry.set_state(TARGET, ConnState.RECONNECTING, error=describe(exc))
                    if loop.time() - began >= _STABLE_AFTER:
                        backoff.reset()
                    await asyncio.sleep(backoff.next_delay())
        except asyncio.CancelledError:
            self._drain()
            if self._keeping:  # the rejected events among them reach the dead-letter file
                await asyncio.wait(list(self._keeping), timeout=_KEEP_ON_SHUTDOWN_TIMEOUT)
            raise

    def _drain(self) -> None:
        """At shutdown: buffer every event already read (the caller flushes the buffer)."""
        while self._events:
            self._handle(self._events.popleft())
        self._queue_depth.set(0)

    async def _connection(self) -> None:
        """One connection, from connect to close. Returns never: raises why it ended."""
        self.connection_attempts += 1
        settings = self._settings
        assert settings.ha_url is not None
        assert settings.ha_token is not None
        client = _client(settings, on_events=self._on_events, read_coalescing=_READ_COALESCING)
        try:
            async with client:
                self._client = client
                await self._start_session()
                self._telemetry.set_state(TARGET, ConnState.CONNECTED)
                await client.closed()
        except AuthInvalidError as exc:
            raise AuthInvalidError(
                f"Home Assistant rejected HA_INGESTOR_HA_TOKEN (auth_invalid: {exc}); not "
                "retrying, since repeated failed logins get this host banned. Create a new "
                "long-lived access token (Home Assistant profile page → Security) and restart."
            ) from None
        finally:
            self._client = None
            tasks = list(self._connection_tasks)
            self._connection_tasks.clear()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._probe = None

    async def _start_session(self) -> None:
        try:
            await self._registries.load(self._call)
        except CommandError as exc:
            self._telemetry.warn_throttled(
                "homeassistant-registries",
                3600,
                "registries unavailable: points lack area, device and platform tags",
                error=str(exc),
            )
        self._spawn(self._registry_loop(), "homeassistant-registries")

        # The gap starts at the newest event read before (or, on the first connection, at the
        # stored checkpoint) and ends where this connection's live stream begins.
        gap_start = self._hold_ns
        if gap_start is None and self._last_received is not None:
            gap_start = parse_time_ns(self._last_received)
        first = gap_start is None and self._durable_ns is None
        if first:
            # The very first subscription: the few seconds before it are back-filled too, so
            # that the first checkpoint is true — everything after it is stored (an import
            # stops there).
            gap_start = time.time_ns() - FIRST_BACKFILL_NS
        probe = None
        if gap_start is not None and self._wants_states:
            self._hold_ns = gap_start
            probe = self._probe = LiveProbe()
        await self._subscribe()
        if first and gap_start is not None:
            await self._first_checkpoint(gap_start)
        if probe is not None and gap_start is not None:
            self._spawn(self._fill_gap(gap_start, probe), "homeassistant-backfill")

    async def _subscribe(self) -> None:
        await subscribe_events(self._call, self._settings.ha_event_types)

    # --- framing -----------------------------------------------------------------------------------
    def _on_events(self, batch: Events) -> None:
        """Called by the client with the events of one message: hand off, nothing else."""
        batch = self._within_bound(batch)
        if not batch:
            return
        events = self._events
        events.extend(batch)
        self._received.inc(len(batch))
        self._last_received = batch[-1].get("time_fired")
        probe = self._probe
        if probe is not None:
            for event in batch:
                if event.get("event_type") == "state_changed":
                    self._probe_saw(probe, event)
        self._events_ready.set()

    # --- the bound on held events ---------------------------------------------------------------------
    def _within_bound(self, batch: Events) -> Events:
        """Hold at most ``ha_max_held_events`` (the buffer takes none while the spool's disk is
        full): newer events are shed, and the time from the first of them on becomes a gap
        for the back-fill, held in the checkpoint until filled."""
        room = self._max_held - len(self._events)
        if room >= len(batch):
            if self._shed_from_ns is not None:
                self._end_shedding()
            return batch
        kept, shed = batch[: max(0, room)], batch[max(0, room) :]
        telemetry = self._telemetry
        telemetry.dropped("ha_events_shed", len(shed), intentional=False)
        if self._shed_from_ns is None:
            try:
                first_ns = parse_time_ns(str(shed[0].get("time_fired")))
            except (ValueError, TypeError):
                first_ns = int(telemetry.clock() * 1e9)
            # Just before it: the back-fill takes a row at its very start for the state the
            # gap began with, not for a change.
            first_ns -= 1000
            self._shed_from_ns = first_ns
            self._hold_ns = first_ns if self._hold_ns is None else min(self._hold_ns, first_ns)
        telemetry.warn_throttled(
            "homeassistant-shed",
            60,
            "home assistant events not held, left to the back-fill",
            held=len(self._events),
            shed=len(shed),
        )
        return kept

    def _end_shedding(self) -> None:
        """Events fit again: back-fill from the first one shed to the next live state change
        (with a back-fill of a reconnect still running, wait until it is done)."""
        start = self._shed_from_ns
        if start is None or self._probe is not None:
            return
        self._shed_from_ns = None
        if self._client is None or not self._wants_states:
            return  # the next connection back-fills from the hold
        self._hold_ns = start if self._hold_ns is None else min(self._hold_ns, start)
        probe = self._probe = LiveProbe()
        self._spawn(self._fill_gap(self._hold_ns, probe), "homeassistant-backfill-shed")
        self._telemetry.log.info("backfill of events not held", since=format_time_ns(start))

    @staticmethod
    def _probe_saw(probe: LiveProbe, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        entity_id = data.get("entity_id")
        time_fired = event.get("time_fired")
        if isinstance(entity_id, str) and isinstance(time_fired, str):
            with contextlib.suppress(ValueError):
                probe.saw(entity_id, time_fired)

    async def _call(self, command: str, **payload: Any) -> Any:
        """One command on the current connection."""
        client = self._client
        if client is None:
            raise ConnectionError("not connected")
        return await client.call(command, **payload)

    def _spawn(self, coroutine: Any, name: str) -> None:
        """A task that lives as long as the current connection."""
        self._connection_tasks.add(asyncio.create_task(coroutine, name=name))

    # --- processing --------------------------------------------------------------------------------
    async def _process_loop(self) -> None:
        events = self._events
        ready = self._events_ready
        buffer = self._buffer
        depth = self._queue_depth
        handled = 0
        while True:
            if not events:
                depth.set(0)
                ready.clear()
                await ready.wait()
                depth.set(len(events))
                continue
            if buffer.full():
                await buffer.wait_for_room()  # before taking an event: none is in flight
            self._handle(events.popleft())
            handled += 1
            if handled % _PROCESS_AT_ONCE == 0 and events:
                depth.set(len(events))
                await asyncio.sleep(0)  # let the reader run during a long backlog

    def _handle(self, event: dict[str, Any]) -> None:
        """Map, encode and buffer one event (synchronous: nothing is lost to cancellation)."""
        event_type = event.get("event_type")
        if event_type in REGISTRY_EVENTS:
            self._dirty_registries.add(REGISTRY_EVENTS[event_type])
            self._registries_dirty.set()
        telemetry = self._telemetry
        if event_type in self._excluded_event_types:
            telemetry.dropped("filtered_event", intentional=True)
            return
        try:
            if event_type == "state_changed":
                entity_id = (event.get("data") or {}).get("entity_id")
                if isinstance(entity_id, str) and len(self._known_entities) < _MAX_KNOWN_ENTITIES:
                    self._known_entities.add(entity_id)
            point = self._mapper.map_event(event)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            telemetry.invalid(TARGET, "malformed_event", error=describe(exc))
            telemetry.dropped("malformed_event", intentional=False)
            telemetry.warn_throttled(
                "homeassistant-malformed",
                60,
                "event not stored",
                event_type=str(event_type),
                error=describe(exc),
            )
            self._keep_rejected(event, f"malformed event: {describe(exc)}")
            return
        if point is None:
            telemetry.dropped("filtered_event", intentional=True)
            return
        try:
            line = encode_point(point)
        except ValueError as exc:
            telemetry.dropped("unencodable", intentional=False)
            telemetry.warn_throttled(
                "homeassistant-unencodable",
                60,
                "point cannot be encoded",
                event_type=str(event_type),
                error=str(exc),
            )
            self._keep_rejected(event, f"point cannot be encoded: {exc}")
            return
        accepted = self._buffer.add(line)
        # One callback per group of lines: the newest event time of the group is durable
        # when the group's future resolves.
        if accepted is not self._group_future:
            self._group_future = accepted
            self._group_latest = latest = [point.time_ns]
            accepted.add_done_callback(lambda done: self._durable(done, latest[0]))
        elif point.time_ns > self._group_latest[0]:
            self._group_latest[0] = point.time_ns

    def _keep_rejected(self, event: dict[str, Any], reason: str) -> None:
        """The event as Home Assistant sent it, into the dead-letter file (in the background:
        ``_handle`` stays synchronous)."""
        dead_letters = self._dead_letters
        if dead_letters is None:
            return

        async def keep() -> None:
            try:
                await dead_letters.add_event(event, reason)
            except OSError as exc:
                self._telemetry.error(
                    TARGET, "rejected event not kept", error=describe(exc), reason=reason
                )

        task = asyncio.get_running_loop().create_task(keep(), name="homeassistant-dead-letter")
        self._keeping.add(task)
        task.add_done_callback(self._keeping.discard)

    def _durable(self, done: asyncio.Future[None], time_ns: int) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        if self._durable_ns is None or time_ns > self._durable_ns:
            self._durable_ns = time_ns

    # --- checkpoint --------------------------------------------------------------------------------
    def checkpoint(self) -> str | None:
        """The time everything before which is durable: the newest durable event, but never
        past the start of a gap whose back-fill is not durable yet."""
        durable, hold = self._durable_ns, self._hold_ns
        if durable is None:
            return None
        return format_time_ns(durable if hold is None else min(durable, hold))

    async def _first_checkpoint(self, start_ns: int) -> None:
        """The very first subscription: nothing before ``start_ns`` is owed, everything after
        it is. Saved at once, so that a stop before the first regular save (SIGKILL included)
        back-fills from here. A few seconds before the subscription (clocks of two hosts):
        points stored twice collapse into one."""
        self._durable_ns = start_ns
        value = format_time_ns(start_ns)
        await self._checkpoints.save(CHECKPOINT_KEY, value)
        self._saved = value

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            value = self.checkpoint()
            if value is not None and value != self._saved:
                await self._checkpoints.save(CHECKPOINT_KEY, value)
                self._saved = value

    # --- registries --------------------------------------------------------------------------------
    async def _registry_loop(self) -> None:
        """Re-fetch a registry after ``*_registry_updated`` events, once per burst."""
        dirty = self._dirty_registries
        while True:
            await self._registries_dirty.wait()
            await asyncio.sleep(_REGISTRY_DEBOUNCE)
            self._registries_dirty.clear()
            names = sorted(dirty)
            dirty.clear()
            for name in names:
                try:
                    await self._registries.load(self._call, name)
                except CommandError as exc:
                    self._telemetry.warn_throttled(
                        "homeassistant-registries", 3600, "registry refresh failed", error=str(exc)
                    )

    # --- back-fill ---------------------------------------------------------------------------------
    async def _fill_gap(self, start_ns: int, probe: LiveProbe) -> None:
        """Back-fill from ``start_ns`` to the first live state change, then release the
        checkpoint hold. On failure the hold stays: the next connection tries again.

        Without the recorder's confirmation within the settle time the gap is read at once
        (most of it is usually committed) and, the hold kept, read again once the recorder
        has caught up — or given up on after ``_RECORDER_RECHECK`` s."""
        telemetry = self._telemetry
        backfill = self._backfill
        settle = self._settings.ha_backfill_settle
        try:
            confirmed = settle <= 0 or await backfill.wait_for_recorder(probe, settle)
            count = await backfill.run(start_ns, probe.first_ns, self._known_entities)
            telemetry.metrics.backfilled.inc(count)
            if not confirmed:
                telemetry.log.info(
                    "backfill without recorder confirmation",
                    waited=settle,
                    reason="no recorded live state change yet",
                    read_again_within=_RECORDER_RECHECK,
                )
                if await backfill.wait_for_recorder(probe, _RECORDER_RECHECK, max_delay=5.0):
                    again = await backfill.run(start_ns, probe.first_ns, self._known_entities)
                    telemetry.metrics.backfilled.inc(max(0, again - count))
        except CommandError as exc:
            telemetry.error(TARGET, "backfill failed", error=str(exc))
            if exc.code == "unknown_command":  # no history integration: nothing to wait for
                self._release_hold(start_ns)
            return
        except (ConnectionError, TimeoutError) as exc:
            telemetry.error(TARGET, "backfill failed", error=describe(exc))
            return
        self._release_hold(start_ns)

    def _release_hold(self, start_ns: int) -> None:
        if self._hold_ns == start_ns:
            # Events shed meanwhile still wait for their back-fill: the hold moves to them.
            self._hold_ns = self._shed_from_ns
        self._probe = None
        if self._shed_from_ns is not None and len(self._events) < self._max_held:
            self._end_shedding()  # they could not start while this back-fill ran


def _client(
    settings: Settings,
    on_events: Callable[[Events], None] | None = None,
    read_coalescing: float = 0.0,
) -> HomeAssistantClient:
    assert settings.ha_url is not None
    assert settings.ha_token is not None
    return HomeAssistantClient(
        settings.ha_url,
        settings.ha_token.get_secret_value(),
        ssl_context=ha_tls_context(settings),
        call_timeout=_CALL_TIMEOUT,
        ping_interval=settings.ha_ping_interval,
        ping_timeout=settings.ha_ping_timeout,
        read_coalescing=read_coalescing,
        on_events=on_events,
    )


async def decide_instance(
    settings: Settings,
    checkpoints: Checkpoints,
    wait: float = _INSTANCE_WAIT,
) -> str:
    """The ``instance`` tag for this run, decided before the first point and kept."""
    if settings.instance:
        return settings.instance
    if not settings.ha_enabled:
        return socket.gethostname()
    saved = checkpoints.load(INSTANCE_KEY)
    if saved:
        return saved
    location = None
    # Unreachable, refused or slow: the host name, and the source reports why when it connects.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(wait), _client(settings) as client:
            config = await client.call("get_config")
            if isinstance(config, dict) and config.get("location_name"):
                location = str(config["location_name"])
    instance = location or socket.gethostname()
    await checkpoints.save(INSTANCE_KEY, instance)
    return instance
