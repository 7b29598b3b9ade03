"""A TCP proxy in front of a real MQTT broker, for faults the broker itself does not make:
refusing MQTT 5 the way a 3.1.1-only broker does, losing packets in either direction, and
cutting every connection at once."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.servers import HOST

#: CONNACK, 3.1.1 form, return code 1: "unacceptable protocol version"
REFUSE_PROTOCOL = b"\x20\x02\x00\x01"


class MqttProxy:
    """``port`` forwards to the broker. ``drop_from_client`` / ``drop_from_broker`` discard
    what passes in that direction (an acknowledgement that never arrives, a message the broker
    counts as sent but the client never sees); ``cut()`` closes every connection."""

    def __init__(self, broker_host: str, broker_port: int, *, refuse_mqtt5: bool = False):
        self._broker = (broker_host, broker_port)
        self.refuse_mqtt5 = refuse_mqtt5
        self.drop_from_client = False
        self.drop_from_broker = False
        self.dropped_from_broker = 0  # bytes
        self.connections = 0
        self.refused = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> MqttProxy:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._proxy(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The CONNECT's protocol level is byte 9 of the packet for a one-byte remaining length
        # (a subscriber's CONNECT is short).
        head = await reader.readexactly(9)
        if self.refuse_mqtt5 and head[8] == 5:
            self.refused += 1
            writer.write(REFUSE_PROTOCOL)
            await writer.drain()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._broker)
        self.connections += 1
        self._writers |= {writer, upstream_writer}
        upstream_writer.write(head)
        try:
            await asyncio.gather(
                self._pipe(reader, upstream_writer, from_client=True),
                self._pipe(upstream_reader, writer, from_client=False),
            )
        finally:
            upstream_writer.transport.abort()
            self._writers -= {writer, upstream_writer}

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_client: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if from_client and self.drop_from_client:
                    continue
                if not from_client and self.drop_from_broker:
                    self.dropped_from_broker += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()
