"""A Home Assistant WebSocket API client: one connection, its commands and its event stream.

It knows the protocol and nothing about points, buffers or checkpoints: the ingest loop
(:mod:`ha_ingestor.sources.homeassistant`) and the history importer both use it.

``async with HomeAssistantClient(...) as client`` connects, authenticates, switches on
``coalesce_messages`` and from then on decodes each message as it is read, resolving the
command it answers or handing its events to ``on_events`` (synchronously: reading never waits
on the consumer). At a trickle, with no command waiting for its answer, the socket is read at
most every ``read_coalescing`` seconds, so that a few events cost one wake-up rather than one
each. An application *ping* ends the connection when no pong comes back in time.
``await client.closed()`` returns never; it raises why the connection ended. Leaving the block
stops the ping, fails every pending command and closes the connection.

Exceptions:
- :class:`AuthInvalidError` — Home Assistant refused the token (``auth_invalid``): do not retry;
- :class:`CommandError` — a command was answered with ``success: false``;
- ``OSError`` (``ConnectionError``, :class:`~.websocket.WebSocketError`, ``ssl.SSLError``) /
  ``TimeoutError`` — transport problems: the connection is gone, a new one may succeed
  (:class:`NotHomeAssistantError`: the URL answers, but not as Home Assistant does);
- ``ValueError`` — a frame that is not JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, Self

import orjson

from ha_ingestor.sources.websocket import WebSocketConnection

Events = list[dict[str, Any]]


class AuthInvalidError(Exception):
    """Home Assistant refused the token. Retrying would only risk an IP ban."""


class NotHomeAssistantError(ConnectionError):
    """The WebSocket's first message is not Home Assistant's ``auth_required``."""


class CommandError(Exception):
    """Home Assistant answered a command with ``success: false``."""

    def __init__(self, command: str, code: str, message: str) -> None:
        super().__init__(f"{command}: {code}: {message}")
        self.command = command
        self.code = code


def websocket_url(base_url: str) -> str:
    """``http(s)://host:8123`` → ``ws(s)://host:8123/api/websocket``."""
    return base_url.replace("http", "ws", 1).rstrip("/") + "/api/websocket"


class HomeAssistantClient:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        ssl_context: ssl.SSLContext | bool = True,
        call_timeout: float = 60.0,
        ping_interval: float | None = None,
        ping_timeout: float = 10.0,
        read_coalescing: float = 0.0,
        on_events: Callable[[Events], None] | None = None,
    ) -> None:
        self._url = websocket_url(url)
        self._token = token
        self._ssl = ssl_context if isinstance(ssl_context, ssl.SSLContext) else None
        self._call_timeout = call_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._read_coalescing = read_coalescing
        self._on_events = on_events
        self._connection: WebSocketConnection | None = None
        self._greeting: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._authenticated = False
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 1
        self._tasks: list[asyncio.Task[Any]] = []
        #: The version Home Assistant announced in ``auth_required``.
        self.ha_version: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        connection = WebSocketConnection(
            self._url,
            self._received,
            ssl_context=self._ssl,
            timeout=self._call_timeout,
            read_coalescing=self._read_coalescing,
            may_coalesce=lambda: not self._pending,
        )
        self._connection = connection
        try:
            await connection.connect()
            await self._authenticate(connection)
            self._tasks.append(
                asyncio.create_task(connection.wait_closed(), name="homeassistant-connection")
            )
            if self._ping_interval is not None:
                self._tasks.append(
                    asyncio.create_task(self._ping_loop(), name="homeassistant-ping")
                )
            await self.call("supported_features", features={"coalesce_messages": 1})
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._fail_pending(ConnectionError("connection closed"))
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def closed(self) -> NoReturn:
        """Wait until the connection ends; raise why."""
        await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in self._tasks:
            if task.done():
                error = task.result()  # the ping's failure raises here
                if isinstance(error, Exception):
                    raise error
        raise ConnectionError("connection closed by Home Assistant")

    async def _authenticate(self, connection: WebSocketConnection) -> None:
        async with asyncio.timeout(self._call_timeout):
            hello = await self._next_greeting(connection)
            if hello.get("type") != "auth_required":
                raise NotHomeAssistantError(f"unexpected greeting: {hello.get('type')!r}")
            self.ha_version = str(hello.get("ha_version") or "") or None
            connection.send_text(orjson.dumps({"type": "auth", "access_token": self._token}))
            answer = await self._next_greeting(connection)
        if answer.get("type") == "auth_invalid":
            raise AuthInvalidError(str(answer.get("message") or "invalid token"))
        if answer.get("type") != "auth_ok":
            raise ConnectionError(f"unexpected answer to auth: {answer.get('type')!r}")
        self._authenticated = True

    async def _next_greeting(self, connection: WebSocketConnection) -> dict[str, Any]:
        """The next message before authentication; raises why if the connection ends first."""
        message = asyncio.ensure_future(self._greeting.get())
        ended = asyncio.ensure_future(connection.wait_closed())
        try:
            await asyncio.wait((message, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            message.cancel()
        if message.done() and not message.cancelled():
            return message.result()
        reason = ended.result() if ended.done() and not ended.cancelled() else None
        raise reason or ConnectionError("Home Assistant closed the connection before auth")

    # --- commands ----------------------------------------------------------------------------------
    async def call(self, command: str, **payload: Any) -> Any:
        """Send one command and return its result; :class:`CommandError` if it failed."""
        connection = self._connection
        if connection is None or connection.closed:
            raise ConnectionError("not connected")
        message_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        try:
            connection.send_text(orjson.dumps({"id": message_id, "type": command, **payload}))
            # Not wait_for, which can swallow a cancellation on 3.11 (pipeline.buffer.wait_event).
            async with asyncio.timeout(self._call_timeout):
                frame = await future
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

    # --- reading -----------------------------------------------------------------------------------
    def _received(self, data: bytes) -> None:
        """One message, as it is read: answers resolve their command, events go on at once."""
        try:
            decoded = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"a message from Home Assistant that is not JSON: {exc}") from None
        if not self._authenticated:
            self._greeting.put_nowait(decoded)
            return
        pending = self._pending
        events: Events = []
        for frame in decoded if isinstance(decoded, list) else (decoded,):
            if frame.get("type") == "event":
                events.append(frame["event"])
            else:
                future = pending.pop(frame.get("id", -1), None)
                if future is not None and not future.done():
                    future.set_result(frame)
        if events and self._on_events is not None:
            self._on_events(events)

    async def _ping_loop(self) -> None:
        assert self._ping_interval is not None
        while True:
            await asyncio.sleep(self._ping_interval)
            try:
                async with asyncio.timeout(self._ping_timeout):
                    await self.call("ping")
            except TimeoutError:
                raise ConnectionError(
                    f"no pong within {self._ping_timeout:g} s: connection presumed dead"
                ) from None
