"""The Home Assistant source: every event on the bus, through the WebSocket API.

One connection at a time: authenticate, switch on ``coalesce_messages``, read ``get_config``
(the ``instance`` tag) and the entity/device/area registries, subscribe to events, then
back-fill the gap since the last stored event from the recorder's history
(:mod:`ha_ingestor.pipeline.ha_backfill`).

Three tasks, so that Home Assistant never sees a slow consumer:
- the *reader* only reads a frame, decodes it and appends its events to an unbounded deque
  (its depth is ``ha_ingestor_queue_depth{queue="homeassistant"}``); it never waits on
  processing, disk or InfluxDB;
- the *processor* maps events to points, encodes and buffers them, and waits when the buffer
  is full — only it feels back-pressure;
- an application *ping* with a timeout detects a dead connection.

Errors:
- transport errors (refused, closed, no pong, malformed frame) → ``RECONNECTING``, capped
  jittered exponential backoff, reconnect, resubscribe, back-fill;
- :class:`AuthInvalidError` (``auth_invalid``) and :class:`NotAllowedError` (a non-admin
  token asked for all events) → ``FAILED`` with an actionable message and no more attempts:
  repeated bad logins get an IP banned, and only the operator can fix either;
- :class:`CommandError` — Home Assistant answered a command with an error.

Checkpoint: ``homeassistant.last_event`` holds the time of the newest event whose point is
durable, held back to the start of a gap until that gap's back-fill is durable too; a restart
of the ingestor back-fills from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from ha_ingestor.config import Settings
from ha_ingestor.pipeline.buffer import Buffer, Checkpoints
from ha_ingestor.pipeline.ha_backfill import HistoryBackfill, LiveProbe
from ha_ingestor.pipeline.ha_events import EntityFilter, Mapper, format_time_ns, parse_time_ns
from ha_ingestor.sinks.line_protocol import encode_point
from ha_ingestor.sources.backoff import Backoff
from ha_ingestor.sources.ha_registry import REGISTRY_EVENTS, Registries
from ha_ingestor.telemetry import ConnState, Telemetry

TARGET = "homeassistant"
CHECKPOINT_KEY = "homeassistant.last_event"
_CALL_TIMEOUT = 60.0  # a command's answer (get_states and history can be large and slow)
_STABLE_AFTER = 30.0  # a connection up this long resets the backoff
_REGISTRY_DEBOUNCE = 0.5  # registry events come in bursts: re-fetch once per burst
_MAX_KNOWN_ENTITIES = 100_000


class AuthInvalidError(Exception):
    """Home Assistant refused the token. Retrying would only risk an IP ban."""


class NotAllowedError(Exception):
    """The token may not do what the source needs (a non-admin user's token)."""


class CommandError(Exception):
    """Home Assistant answered a command with ``success: false``."""

    def __init__(self, command: str, code: str, message: str) -> None:
        super().__init__(f"{command}: {code}: {message}")
        self.command = command
        self.code = code


class HomeAssistantSource:
    def __init__(
        self,
        settings: Settings,
        buffer: Buffer,
        telemetry: Telemetry,
        session: aiohttp.ClientSession,
        checkpoints: Checkpoints,
        on_instance: Callable[[str], None] | None = None,
    ) -> None:
        if settings.ha_url is None or settings.ha_token is None:
            raise ValueError("HA_INGESTOR_HA_URL and HA_INGESTOR_HA_TOKEN are both needed")
        self._settings = settings
        self._buffer = buffer
        self._telemetry = telemetry
        self._session = session
        self._checkpoints = checkpoints
        self._on_instance = on_instance
        self._url = settings.ha_url.replace("http", "ws", 1) + "/api/websocket"
        self._registries = Registries()
        self._mapper = Mapper(
            instance=settings.instance or socket.gethostname(),
            static_tags=settings.tags,
            exclude_attributes=frozenset(settings.ha_exclude_attributes),
            entity_filter=EntityFilter(settings.ha_include_entities, settings.ha_exclude_entities),
            exclude_event_types=frozenset(settings.ha_exclude_event_types),
            entity_info=self._registries.info,
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
        self._received = telemetry.metrics.events_received.labels(TARGET)
        self._queue_depth = telemetry.metrics.queue_depth.labels(TARGET)
        # reader → processor
        self._events: deque[dict[str, Any]] = deque()
        self._events_ready = asyncio.Event()
        self._last_received: str | None = None  # time_fired of the newest event read
        self._probe: LiveProbe | None = None  # while a gap waits for its back-fill
        # commands of the current connection
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 1
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
                    except (AuthInvalidError, NotAllowedError) as exc:
                        telemetry.set_state(TARGET, ConnState.FAILED, error=str(exc))
                        await asyncio.Event().wait()  # stay up, not ready, until stopped
                    except (
                        aiohttp.ClientError,
                        OSError,
                        TimeoutError,
                        ValueError,  # a malformed frame
                        CommandError,
                    ) as exc:
                        telemetry.set_state(TARGET, ConnState.RECONNECTING, error=_describe(exc))
                    if loop.time() - began >= _STABLE_AFTER:
                        backoff.reset()
                    await asyncio.sleep(backoff.next_delay())
        except asyncio.CancelledError:
            self._drain()
            raise

    def _drain(self) -> None:
        """At shutdown: buffer every event already read (the caller flushes the buffer)."""
        while self._events:
            self._handle(self._events.popleft())
        self._queue_depth.set(0)

    def _ssl(self) -> ssl.SSLContext | bool:
        settings = self._settings
        if not self._url.startswith("wss://"):
            return True
        context = ssl.create_default_context(
            cafile=str(settings.ha_ca_file) if settings.ha_ca_file else None
        )
        if settings.ha_tls_insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def _connection(self) -> None:
        """One connection, from connect to close. Returns never: raises why it ended."""
        self.connection_attempts += 1
        async with asyncio.timeout(_CALL_TIMEOUT):
            ws = await self._session.ws_connect(
                self._url, max_msg_size=0, ssl=self._ssl(), autoping=True, heartbeat=None
            )
        try:
            await self._authenticate(ws)
            self._ws = ws
            self._next_id = 1
            reader = asyncio.create_task(self._read_loop(ws), name="homeassistant-reader")
            self._connection_tasks.add(reader)
            await self._start_session()
            self._telemetry.set_state(TARGET, ConnState.CONNECTED)
            pinger = asyncio.create_task(self._ping_loop(), name="homeassistant-ping")
            self._connection_tasks.add(pinger)
            await asyncio.wait({reader, pinger}, return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, pinger):
                if task.done():
                    task.result()  # raises why the connection ended, if it failed
            raise ConnectionError("connection closed by Home Assistant")
        finally:
            self._ws = None
            tasks = list(self._connection_tasks)
            self._connection_tasks.clear()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._fail_pending(ConnectionError("connection closed"))
            self._probe = None
            await ws.close()

    async def _authenticate(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        token = self._settings.ha_token
        assert token is not None
        async with asyncio.timeout(_CALL_TIMEOUT):
            hello = await ws.receive_json(loads=orjson.loads)
            if hello.get("type") != "auth_required":
                raise ConnectionError(f"unexpected greeting: {hello.get('type')!r}")
            # Home Assistant reads text frames only.
            await ws.send_str(
                orjson.dumps({"type": "auth", "access_token": token.get_secret_value()}).decode()
            )
            answer = await ws.receive_json(loads=orjson.loads)
        if answer.get("type") == "auth_invalid":
            reason = answer.get("message") or "invalid token"
            raise AuthInvalidError(
                f"Home Assistant rejected HA_INGESTOR_HA_TOKEN (auth_invalid: {reason}); not "
                "retrying, since repeated failed logins get this host banned. Create a new "
                "long-lived access token (Home Assistant profile page → Security) and restart."
            )
        if answer.get("type") != "auth_ok":
            raise ConnectionError(f"unexpected answer to auth: {answer.get('type')!r}")

    async def _start_session(self) -> None:
        await self._call("supported_features", features={"coalesce_messages": 1})
        config = await self._call("get_config")
        if not self._settings.instance and isinstance(config, dict) and config.get("location_name"):
            instance = str(config["location_name"])
            self._mapper.instance = instance
            if self._on_instance is not None:
                self._on_instance(instance)
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
        probe = None
        if gap_start is not None and self._wants_states:
            self._hold_ns = gap_start
            probe = self._probe = LiveProbe()
        await self._subscribe()
        if probe is not None and gap_start is not None:
            self._spawn(self._fill_gap(gap_start, probe), "homeassistant-backfill")

    async def _subscribe(self) -> None:
        try:
            if self._settings.ha_event_types:
                for event_type in self._settings.ha_event_types:
                    await self._call("subscribe_events", event_type=event_type)
            else:
                await self._call("subscribe_events")
        except CommandError as exc:
            if exc.code == "unauthorized":
                raise NotAllowedError(
                    "Home Assistant refused to let this token subscribe to "
                    f"{'these events' if self._settings.ha_event_types else 'all events'} "
                    "(unauthorized): only an administrator's token may. Use a long-lived "
                    "access token of an administrator, or set HA_INGESTOR_HA_EVENT_TYPES to "
                    "events any user may subscribe to (e.g. state_changed)."
                ) from None
            raise

    # --- framing -----------------------------------------------------------------------------------
    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read, decode, hand off. Never waits on anything but the socket."""
        events = self._events
        pending = self._pending
        received = self._received
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                if message.type is aiohttp.WSMsgType.BINARY:
                    continue
                break  # ERROR / CLOSE
            decoded = orjson.loads(message.data)
            for frame in decoded if isinstance(decoded, list) else (decoded,):
                kind = frame.get("type")
                if kind == "event":
                    event = frame["event"]
                    events.append(event)
                    self._last_received = event.get("time_fired")
                    probe = self._probe
                    if probe is not None and event.get("event_type") == "state_changed":
                        self._probe_saw(probe, event)
                    received.inc()
                else:
                    future = pending.pop(frame.get("id", -1), None)
                    if future is not None and not future.done():
                        future.set_result(frame)
            self._queue_depth.set(len(events))
            self._events_ready.set()
        exc = ws.exception()
        if exc is not None:
            raise ConnectionError(f"WebSocket error: {_describe(exc)}")

    @staticmethod
    def _probe_saw(probe: LiveProbe, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        entity_id = data.get("entity_id")
        time_fired = event.get("time_fired")
        if isinstance(entity_id, str) and isinstance(time_fired, str):
            with contextlib.suppress(ValueError):
                probe.saw(entity_id, time_fired)

    async def _call(self, command: str, **payload: Any) -> Any:
        """Send one command and return its result; CommandError if it failed."""
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        message_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        try:
            await ws.send_str(orjson.dumps({"id": message_id, "type": command, **payload}).decode())
            frame = await asyncio.wait_for(future, _CALL_TIMEOUT)
        finally:
            self._pending.pop(message_id, None)
        if frame.get("type") == "pong":
            return None
        if not frame.get("success", False):
            error = frame.get("error") or {}
            raise CommandError(command, str(error.get("code", "")), str(error.get("message", "")))
        return frame.get("result")

    def _fail_pending(self, exc: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()

    async def _ping_loop(self) -> None:
        settings = self._settings
        while True:
            await asyncio.sleep(settings.ha_ping_interval)
            try:
                await asyncio.wait_for(self._call("ping"), settings.ha_ping_timeout)
            except TimeoutError:
                raise ConnectionError(
                    f"no pong within {settings.ha_ping_timeout:g} s: connection presumed dead"
                ) from None

    def _spawn(self, coroutine: Any, name: str) -> None:
        """A task that lives as long as the current connection."""
        self._connection_tasks.add(asyncio.create_task(coroutine, name=name))

    # --- processing --------------------------------------------------------------------------------
    async def _process_loop(self) -> None:
        events = self._events
        ready = self._events_ready
        buffer = self._buffer
        while True:
            if not events:
                self._queue_depth.set(0)
                ready.clear()
                await ready.wait()
                continue
            if buffer.full():
                await buffer.wait_for_room()  # before taking an event: none is in flight
            self._handle(events.popleft())
            if len(events) % 256 == 0:
                self._queue_depth.set(len(events))
                await asyncio.sleep(0)  # let the reader run during a long backlog

    def _handle(self, event: dict[str, Any]) -> None:
        """Map, encode and buffer one event (synchronous: nothing is lost to cancellation)."""
        event_type = event.get("event_type")
        if event_type in REGISTRY_EVENTS:
            self._dirty_registries.add(REGISTRY_EVENTS[event_type])
            self._registries_dirty.set()
        telemetry = self._telemetry
        try:
            if event_type == "state_changed":
                entity_id = (event.get("data") or {}).get("entity_id")
                if isinstance(entity_id, str) and len(self._known_entities) < _MAX_KNOWN_ENTITIES:
                    self._known_entities.add(entity_id)
            point = self._mapper.map_event(event)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            telemetry.invalid(TARGET, "malformed_event", error=_describe(exc))
            telemetry.dropped("malformed_event", intentional=False)
            telemetry.warn_throttled(
                "homeassistant-malformed",
                60,
                "event not stored",
                event_type=str(event_type),
                error=_describe(exc),
            )
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
        checkpoint hold. On failure the hold stays: the next connection tries again."""
        telemetry = self._telemetry
        settle = self._settings.ha_backfill_settle
        try:
            if settle > 0 and not await self._backfill.wait_for_recorder(probe, settle):
                telemetry.log.info(
                    "backfill without recorder confirmation",
                    waited=settle,
                    reason="no recorded live state change yet",
                )
            await self._backfill.run(start_ns, probe.first_ns, self._known_entities)
        except CommandError as exc:
            telemetry.error(TARGET, "backfill failed", error=str(exc))
            if exc.code == "unknown_command":  # no history integration: nothing to wait for
                self._release_hold(start_ns)
            return
        except (ConnectionError, TimeoutError) as exc:
            telemetry.error(TARGET, "backfill failed", error=_describe(exc))
            return
        self._release_hold(start_ns)

    def _release_hold(self, start_ns: int) -> None:
        if self._hold_ns == start_ns:
            self._hold_ns = None
        self._probe = None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
