"""The Home Assistant source: every event on the bus, through the WebSocket API.

One connection at a time: authenticate, switch on ``coalesce_messages``, load the registries and
``get_config``, subscribe to events, then back-fill the gap since the last stored event from
the recorder's history. The reader task only reads, decodes and hands events to a queue, so a
slow disk or InfluxDB never makes Home Assistant drop us as a slow consumer. An application
ping with a timeout detects a dead connection; reconnects use capped, jittered backoff.

``auth_invalid`` stops reconnecting (repeated bad logins get an IP banned): the source reports
FAILED with the reason and waits for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson

from ha_ingestor.config import Settings
from ha_ingestor.pipeline.buffer import Buffer, Checkpoints
from ha_ingestor.pipeline.ha_events import EntityFilter, Mapper, parse_time_ns
from ha_ingestor.sinks.line_protocol import encode_point
from ha_ingestor.sources.backoff import Backoff
from ha_ingestor.sources.ha_registry import REGISTRY_EVENTS, Registries
from ha_ingestor.telemetry import ConnState, Telemetry

TARGET = "homeassistant"
CHECKPOINT_KEY = "homeassistant.last_event"
_HISTORY_BATCH = 100  # entity ids per history request
_CALL_TIMEOUT = 60.0


class AuthInvalidError(Exception):
    """Home Assistant refused the token. Retrying would only risk an IP ban."""


class NotAllowedError(Exception):
    """The token may not do what the source needs (a non-admin user's token)."""


class CommandError(Exception):
    def __init__(self, command: str, code: str, message: str) -> None:
        super().__init__(f"{command}: {code}: {message}")
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
        assert settings.ha_url is not None
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
        self._received = telemetry.metrics.events_received.labels(TARGET)
        self._queue_depth = telemetry.metrics.queue_depth.labels(TARGET)
        self._events: deque[dict[str, Any]] = deque()
        self._events_ready = asyncio.Event()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 1
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._durable_latest: str | None = checkpoints.load(CHECKPOINT_KEY)
        self._saved_latest = self._durable_latest
        self.connection_attempts = 0
        self._background: set[asyncio.Task[None]] = set()

    @property
    def mapper(self) -> Mapper:
        return self._mapper

    # --- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        telemetry = self._telemetry
        telemetry.set_state(TARGET, ConnState.CONNECTING)
        backoff = Backoff(base=1.0, cap=60.0)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._process_loop(), name="homeassistant-process")
            group.create_task(self._checkpoint_loop(), name="homeassistant-checkpoint")
            while True:
                try:
                    await self._connection(backoff)
                except AuthInvalidError as exc:
                    telemetry.set_state(TARGET, ConnState.FAILED, error=str(exc))
                    await asyncio.Event().wait()  # stay up, not ready, until stopped
                except NotAllowedError as exc:
                    telemetry.set_state(TARGET, ConnState.FAILED, error=str(exc))
                    await asyncio.Event().wait()
                except (
                    aiohttp.ClientError,
                    OSError,
                    TimeoutError,
                    ConnectionError,
                    CommandError,
                ) as exc:
                    telemetry.set_state(TARGET, ConnState.RECONNECTING, error=_describe(exc))
                await asyncio.sleep(backoff.next_delay())

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

    async def _connection(self, backoff: Backoff) -> None:
        settings = self._settings
        assert settings.ha_token is not None
        self.connection_attempts += 1
        async with self._session.ws_connect(
            self._url, max_msg_size=0, ssl=self._ssl(), autoping=True, heartbeat=None
        ) as ws:
            self._ws = ws
            self._next_id = 1
            hello = await ws.receive_json(timeout=_CALL_TIMEOUT, loads=orjson.loads)
            if hello.get("type") != "auth_required":
                raise ConnectionError(f"unexpected greeting: {hello.get('type')}")
            await ws.send_str(
                orjson.dumps(
                    {"type": "auth", "access_token": settings.ha_token.get_secret_value()}
                ).decode()
            )
            answer = await ws.receive_json(timeout=_CALL_TIMEOUT, loads=orjson.loads)
            if answer.get("type") == "auth_invalid":
                raise AuthInvalidError(
                    "Home Assistant rejected HA_INGESTOR_HA_TOKEN (auth_invalid): not retrying. "
                    "Create a new long-lived access token and restart."
                )
            if answer.get("type") != "auth_ok":
                raise ConnectionError(f"unexpected answer to auth: {answer.get('type')}")
            reader: asyncio.Task[None] = asyncio.create_task(
                self._read_loop(ws), name="homeassistant-reader"
            )
            pinger: asyncio.Task[None] | None = None
            try:
                await self._call("supported_features", features={"coalesce_messages": 1})
                await self._start_session()
                backoff.reset()
                self._telemetry.set_state(TARGET, ConnState.CONNECTED)
                pinger = asyncio.create_task(self._ping_loop(), name="homeassistant-ping")
                done, _ = await asyncio.wait({reader, pinger}, return_when=asyncio.FIRST_COMPLETED)
                for finished in done:
                    finished.result()
                raise ConnectionError("connection closed by Home Assistant")
            finally:
                for task in (reader, pinger, *self._background):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await task
                self._fail_pending(ConnectionError("connection closed"))
                self._ws = None

    async def _start_session(self) -> None:
        config = await self._call("get_config")
        if not self._settings.instance and isinstance(config, dict) and config.get("location_name"):
            instance = str(config["location_name"])
            self._mapper.instance = instance
            if self._on_instance is not None:
                self._on_instance(instance)
        await self._registries.load(self._plain_call)
        backfill_from = self._durable_latest
        try:
            if self._settings.ha_event_types:
                for event_type in self._settings.ha_event_types:
                    await self._call("subscribe_events", event_type=event_type)
            else:
                await self._call("subscribe_events")
        except CommandError as exc:
            if exc.code == "unauthorized":
                raise NotAllowedError(
                    "the token may not subscribe to all events (Home Assistant answered "
                    "'unauthorized'): use a long-lived token of an administrator user, or set "
                    "HA_INGESTOR_HA_EVENT_TYPES to events a normal user may subscribe to "
                    "(e.g. state_changed)"
                ) from None
            raise
        if backfill_from is not None:
            self._spawn(self._backfill_gap(backfill_from), "homeassistant-backfill")

    # --- framing -----------------------------------------------------------------------------------
    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read, decode, hand off: never waits on processing."""
        events = self._events
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                if message.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                    break
                continue
            decoded = orjson.loads(message.data)
            for frame in decoded if isinstance(decoded, list) else (decoded,):
                kind = frame.get("type")
                if kind == "event":
                    events.append(frame["event"])
                    self._received.inc()
                elif kind in ("result", "pong"):
                    future = self._pending.pop(frame.get("id", -1), None)
                    if future is not None and not future.done():
                        future.set_result(frame)
            self._queue_depth.set(len(events))
            self._events_ready.set()

    async def _call(self, command: str, **payload: Any) -> Any:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        message_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        await ws.send_str(orjson.dumps({"id": message_id, "type": command, **payload}).decode())
        frame = await asyncio.wait_for(future, _CALL_TIMEOUT)
        if frame.get("type") == "pong":
            return None
        if not frame.get("success", False):
            error = frame.get("error") or {}
            raise CommandError(command, str(error.get("code", "")), str(error.get("message", "")))
        return frame.get("result")

    async def _plain_call(self, command: str) -> Any:
        return await self._call(command)

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

    # --- processing --------------------------------------------------------------------------------
    async def _process_loop(self) -> None:
        events = self._events
        buffer = self._buffer
        while True:
            if not events:
                self._events_ready.clear()
                await self._events_ready.wait()
            while events:
                event = events.popleft()
                event_type = event.get("event_type")
                if event_type in REGISTRY_EVENTS:
                    self._spawn(self._refresh_registry(REGISTRY_EVENTS[event_type]), "registry")
                try:
                    point = self._mapper.map_event(event)
                except (KeyError, ValueError, TypeError) as exc:
                    self._telemetry.invalid(TARGET, "malformed_event", error=str(exc))
                    continue
                time_fired = event.get("time_fired")
                if point is None:
                    self._telemetry.dropped("filtered_event", intentional=True)
                else:
                    if buffer.full():
                        await buffer.wait_for_room()
                    accepted = buffer.add(encode_point(point))
                    if isinstance(time_fired, str):
                        accepted.add_done_callback(_marker(self, time_fired))
            self._queue_depth.set(0)

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _mark_durable(self, time_fired: str) -> None:
        latest = self._durable_latest
        if latest is None or time_fired > latest:  # ISO strings of one zone sort by time
            self._durable_latest = time_fired

    async def _checkpoint_loop(self) -> None:
        """Persist the time of the newest durable event, so a restart back-fills from there."""
        while True:
            await asyncio.sleep(1.0)
            latest = self._durable_latest
            if latest is not None and latest != self._saved_latest:
                await self._checkpoints.save(CHECKPOINT_KEY, latest)
                self._saved_latest = latest

    async def _refresh_registry(self, which: str) -> None:
        with contextlib.suppress(Exception):
            await self._registries.load(self._plain_call, which)

    # --- back-fill ---------------------------------------------------------------------------------
    async def _backfill_gap(self, since: str) -> None:
        """Back-fill now, and once more when the recorder has surely committed the states of the
        last seconds (it writes in the background): overlapping points collapse in InfluxDB."""
        await self._backfill(since)
        settle = self._settings.ha_backfill_settle
        if settle > 0:
            await asyncio.sleep(settle)
            await self._backfill(since)

    async def _backfill(self, since: str) -> None:
        """Store the state changes the recorder kept between ``since`` and now."""
        telemetry = self._telemetry
        now = datetime.now(UTC)
        start = datetime.fromtimestamp(parse_time_ns(since) / 1e9, UTC)
        oldest = now - timedelta(hours=self._settings.ha_backfill_max_hours)
        if start < oldest:
            telemetry.log.warning(
                "backfill gap capped", since=since, cap_hours=self._settings.ha_backfill_max_hours
            )
            start = oldest
        try:
            states = await self._call("get_states")
            entity_ids = sorted({s["entity_id"] for s in states or []})
            count = 0
            for i in range(0, len(entity_ids), _HISTORY_BATCH):
                history = await self._call(
                    "history/history_during_period",
                    start_time=start.isoformat(),
                    end_time=now.isoformat(),
                    entity_ids=entity_ids[i : i + _HISTORY_BATCH],
                    include_start_time_state=True,
                    significant_changes_only=False,
                    minimal_response=False,
                    no_attributes=False,
                )
                count += await self._store_history(history or {}, start.timestamp())
        except (CommandError, ConnectionError, TimeoutError) as exc:
            telemetry.error(TARGET, "backfill failed", error=_describe(exc))
            return
        telemetry.metrics.backfilled.inc(count)
        telemetry.log.info(
            "backfill done", since=start.isoformat(), until=now.isoformat(), states=count
        )

    async def _store_history(self, history: dict[str, list[dict[str, Any]]], start: float) -> int:
        count = 0
        for entity_id, rows in history.items():
            previous: dict[str, Any] | None = None
            for index, row in enumerate(rows):
                # The first row is the state at start_time, made up by the recorder: not a change.
                if index == 0 and abs(float(row.get("lu", 0)) - start) < 1e-3:
                    previous = row
                    continue
                point = self._mapper.history_point(entity_id, row, previous)
                previous = row
                if point is None:
                    continue
                if self._buffer.full():
                    await self._buffer.wait_for_room()
                self._buffer.add(encode_point(point))
                count += 1
        return count


def _marker(source: HomeAssistantSource, time_fired: str) -> Callable[[asyncio.Future[None]], None]:
    def mark(_: asyncio.Future[None]) -> None:
        source._mark_durable(time_fired)

    return mark


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
