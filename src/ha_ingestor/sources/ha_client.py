"""A Home Assistant WebSocket API client: one connection, its commands and its event stream.

It knows the protocol and nothing about points, buffers or checkpoints: the ingest loop
(:mod:`ha_ingestor.sources.homeassistant`) and the history importer both use it.

``async with HomeAssistantClient(...) as client`` connects, authenticates, switches on
``coalesce_messages`` and starts two tasks: the *reader*, which decodes each frame and either
resolves the command it answers or hands its events to ``on_events`` (synchronously: the
reader never waits on the consumer), and an application *ping* that ends the connection when
no pong comes back in time. ``await client.closed()`` returns never; it raises why the
connection ended. Leaving the block cancels both tasks, fails every pending command and closes
the socket.

Exceptions:
- :class:`AuthInvalidError` — Home Assistant refused the token (``auth_invalid``): do not retry;
- :class:`CommandError` — a command was answered with ``success: false``;
- ``ConnectionError`` / ``OSError`` / ``aiohttp.ClientError`` / ``TimeoutError`` — transport
  problems: the connection is gone, a new one may succeed;
- ``ValueError`` — a frame that is not JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, Self

import aiohttp
import orjson

from ha_ingestor.errors import describe

Events = list[dict[str, Any]]


class AuthInvalidError(Exception):
    """Home Assistant refused the token. Retrying would only risk an IP ban."""


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
        session: aiohttp.ClientSession,
        *,
        ssl_context: ssl.SSLContext | bool = True,
        call_timeout: float = 60.0,
        ping_interval: float | None = None,
        ping_timeout: float = 10.0,
        on_events: Callable[[Events], None] | None = None,
    ) -> None:
        self._url = websocket_url(url)
        self._token = token
        self._session = session
        self._ssl = ssl_context if self._url.startswith("wss://") else True
        self._call_timeout = call_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._on_events = on_events
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 1
        self._tasks: list[asyncio.Task[None]] = []
        #: The version Home Assistant announced in ``auth_required``.
        self.ha_version: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        async with asyncio.timeout(self._call_timeout):
            ws = await self._session.ws_connect(
                self._url, max_msg_size=0, ssl=self._ssl, autoping=True, heartbeat=None
            )
        self._ws = ws
        try:
            await self._authenticate(ws)
            self._tasks.append(
                asyncio.create_task(self._read_loop(ws), name="homeassistant-reader")
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
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    async def closed(self) -> NoReturn:
        """Wait until the connection ends; raise why."""
        await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in self._tasks:
            if task.done():
                task.result()  # raises why the connection ended, if it failed
        raise ConnectionError("connection closed by Home Assistant")

    async def _authenticate(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async with asyncio.timeout(self._call_timeout):
            hello = await ws.receive_json(loads=orjson.loads)
            if hello.get("type") != "auth_required":
                raise ConnectionError(f"unexpected greeting: {hello.get('type')!r}")
            self.ha_version = str(hello.get("ha_version") or "") or None
            # Home Assistant reads text frames only.
            await ws.send_str(orjson.dumps({"type": "auth", "access_token": self._token}).decode())
            answer = await ws.receive_json(loads=orjson.loads)
        if answer.get("type") == "auth_invalid":
            raise AuthInvalidError(str(answer.get("message") or "invalid token"))
        if answer.get("type") != "auth_ok":
            raise ConnectionError(f"unexpected answer to auth: {answer.get('type')!r}")

    # --- commands ----------------------------------------------------------------------------------
    async def call(self, command: str, **payload: Any) -> Any:
        """Send one command and return its result; :class:`CommandError` if it failed."""
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        message_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        try:
            await ws.send_str(orjson.dumps({"id": message_id, "type": command, **payload}).decode())
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

    # --- tasks -------------------------------------------------------------------------------------
    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read, decode, hand off. Never waits on anything but the socket."""
        pending = self._pending
        on_events = self._on_events
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                if message.type is aiohttp.WSMsgType.BINARY:
                    continue
                break  # ERROR / CLOSE
            decoded = orjson.loads(message.data)
            events: Events = []
            for frame in decoded if isinstance(decoded, list) else (decoded,):
                if frame.get("type") == "event":
                    events.append(frame["event"])
                else:
                    future = pending.pop(frame.get("id", -1), None)
                    if future is not None and not future.done():
                        future.set_result(frame)
            if events and on_events is not None:
                on_events(events)
        exc = ws.exception()
        if exc is not None:
            raise ConnectionError(f"WebSocket error: {describe(exc)}")

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
