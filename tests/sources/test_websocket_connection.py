"""The WebSocket connection against an independent server implementation (aiohttp's): the
handshake, pings, closes from either side, large messages and read coalescing at a trickle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import WSMsgType, web

from ha_ingestor.sources.websocket import HandshakeError, WebSocketConnection, WebSocketError
from tests.support.waiting import wait_for

Handler = Callable[[web.WebSocketResponse], Awaitable[None]]


class Server:
    """One aiohttp WebSocket endpoint on a free loopback port, running ``handler`` per client."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.received: list[tuple[WSMsgType, object]] = []
        self.url = ""

    async def endpoint(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await self.handler(ws)
        return ws


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Server:
        server = Server(handler)
        app = web.Application()
        app.router.add_get("/api/websocket", server.endpoint)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        server.url = f"ws://127.0.0.1:{port}/api/websocket"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


async def echo_until_close(server: Server, ws: web.WebSocketResponse) -> None:
    async for message in ws:
        server.received.append((message.type, message.data))
        if message.type is WSMsgType.TEXT:
            await ws.send_str(f"echo {message.data}")


@pytest.mark.timeout(30)
async def test_messages_both_ways_pings_answered_and_a_clean_close(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    pongs: list[bytes] = []

    async def handler(ws: web.WebSocketResponse) -> None:
        await ws.send_str("hello")
        await ws.send_str("é" * 40_000)  # 80 kB: the 64-bit length
        await ws.send_bytes(b"binary is dropped")
        await ws.ping(b"ping-payload")
        while True:  # not ``async for``, which ends before the close frame
            message = await ws.receive()
            if message.type is WSMsgType.PONG:
                pongs.append(message.data)
            else:
                server.received.append((message.type, message.data))
            if message.type is WSMsgType.TEXT:
                await ws.send_str(f"echo {message.data}")
            elif message.type is not WSMsgType.PONG:
                break

    server = await serve(handler)
    messages: list[bytes] = []
    connection = WebSocketConnection(server.url, messages.append)
    await connection.connect()
    await wait_for(lambda: len(messages) == 2)
    connection.send_text(b'{"id": 1}')
    await wait_for(lambda: len(messages) == 3)
    assert messages == [b"hello", "é".encode() * 40_000, b'echo {"id": 1}']
    await wait_for(lambda: pongs == [b"ping-payload"])
    await connection.close()
    assert await connection.wait_closed() is None, "a close of ours is no error"
    await wait_for(lambda: (WSMsgType.CLOSE, 1000) in server.received)


@pytest.mark.timeout(30)
async def test_a_close_from_the_server_says_its_code_and_reason(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async def handler(ws: web.WebSocketResponse) -> None:
        await ws.close(code=4000, message=b"shutting down")

    server = await serve(handler)
    connection = WebSocketConnection(server.url, lambda data: None)
    await connection.connect()
    error = await asyncio.wait_for(connection.wait_closed(), 10)
    assert isinstance(error, WebSocketError)
    assert str(error) == "the server closed the WebSocket (code 4000): shutting down"
    with pytest.raises(WebSocketError):
        connection.send_text(b"too late")


@pytest.mark.timeout(30)
async def test_a_failing_message_handler_ends_the_connection_with_its_error(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async def handler(ws: web.WebSocketResponse) -> None:
        await ws.send_str("not json")
        await ws.receive()

    def on_message(data: bytes) -> None:
        raise ValueError(f"cannot decode {data!r}")

    server = await serve(handler)
    connection = WebSocketConnection(server.url, on_message)
    await connection.connect()
    error = await asyncio.wait_for(connection.wait_closed(), 10)
    assert isinstance(error, ValueError)
    assert "not json" in str(error)


@pytest.mark.timeout(30)
async def test_a_wrong_path_or_a_dead_port_is_a_clear_error(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    server = await serve(lambda ws: asyncio.sleep(0))
    wrong_path = server.url.replace("/api/websocket", "/nothing")
    with pytest.raises(HandshakeError, match="HTTP 404 Not Found"):
        await WebSocketConnection(wrong_path, lambda data: None).connect()
    with pytest.raises(OSError, match=r"Connect call failed|refused"):
        await WebSocketConnection("ws://127.0.0.1:9/", lambda data: None, timeout=5).connect()
    with pytest.raises(ValueError, match="not a ws:// or wss:// URL"):
        WebSocketConnection("http://127.0.0.1/", lambda data: None)


async def read_groups(url: str, coalescing: float, count: int) -> list[list[float]]:
    """Receive ``count`` trickled messages; group them by the read that brought them (messages
    handed on within 5 ms of each other came in one read)."""
    arrivals: list[float] = []
    connection = WebSocketConnection(
        url, lambda data: arrivals.append(time.monotonic()), read_coalescing=coalescing
    )
    await connection.connect()
    await wait_for(lambda: len(arrivals) == count, timeout=20)
    await connection.close()
    groups: list[list[float]] = []
    for arrival in arrivals:
        if groups and arrival - groups[-1][-1] < 0.005:
            groups[-1].append(arrival)
        else:
            groups.append([arrival])
    return groups


@pytest.mark.timeout(60)
async def test_a_trickle_is_read_in_few_wakeups(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    count = 60

    async def trickle(ws: web.WebSocketResponse) -> None:
        for index in range(count):  # 20 ms apart: 1.2 s in all
            await ws.send_str(str(index))
            await asyncio.sleep(0.02)
        await echo_until_close(server, ws)

    server = await serve(trickle)
    coalesced = await read_groups(server.url, 0.5, count)
    assert len(coalesced) <= 6, "at most one read per half second (and the first)"
    immediate = await read_groups(server.url, 0.0, count)
    assert len(immediate) >= 15, "without coalescing each message is read on its own"


@pytest.mark.timeout(60)
async def test_an_awaited_answer_does_not_wait_for_the_coalescing_interval(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async def greet_then_echo(ws: web.WebSocketResponse) -> None:
        await ws.send_str("greeting")
        await echo_until_close(server, ws)

    server = await serve(greet_then_echo)
    received: list[tuple[bytes, float]] = []
    awaiting = False
    connection = WebSocketConnection(
        server.url,
        lambda data: received.append((data, time.monotonic())),
        read_coalescing=30.0,
        may_coalesce=lambda: not awaiting,
    )
    await connection.connect()
    await wait_for(lambda: bool(received))  # after this read, reading is paused for 30 s
    awaiting, sent = True, time.monotonic()
    connection.send_text(b"question")
    await wait_for(lambda: len(received) == 2, timeout=10)
    assert received[1][0] == b"echo question"
    assert received[1][1] - sent < 5.0
    await connection.close()
