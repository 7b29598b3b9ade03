"""A broker on loopback whose every packet the test scripts (for the MQTT client's own tests)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import pytest

from tests.support.servers import HOST
from tests.support.waiting import wait_for


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def publish(
    topic: str, payload: bytes, packet_id: int, *, dup: bool = False, retain: bool = False
) -> bytes:
    """An MQTT 5 QoS 1 PUBLISH as the broker sends it."""
    body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", packet_id)
    body += b"\x00" + payload
    first = 0x32 | (0x08 if dup else 0) | (0x01 if retain else 0)
    return bytes([first]) + _varint(len(body)) + body


def _subscribed_filters(body: bytes) -> list[str]:
    """The topic filters of an MQTT 5 SUBSCRIBE body (packet id, properties, filters)."""
    position, length, shift = 2, 0, 0
    while True:
        byte = body[position]
        position += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    position += length
    filters = []
    while position < len(body):
        (size,) = struct.unpack_from("!H", body, position)
        filters.append(body[position + 2 : position + 2 + size].decode())
        position += 2 + size + 1  # the filter and its options byte
    return filters


class ScriptedBroker:
    """Accepts connections, answers CONNACK (session present or not) and SUBACK, sends what the
    test hands it, and records the acknowledgements per connection."""

    def __init__(self) -> None:
        self.session_present = False
        self.connack_code = 0
        self.answer_pings = True
        self.connections: list[asyncio.StreamWriter] = []
        self.received: list[list[bytes]] = []  # per connection: packets from the client
        self.port = 0
        self.refuse: set[str] = set()  # filters SUBACK refuses (0x87, not authorized)
        self.subscriptions: list[list[str]] = []  # the filters of each SUBSCRIBE
        self._subscribed: list[asyncio.Event] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        packets: list[bytes] = []
        subscribed = asyncio.Event()
        self.received.append(packets)
        self._subscribed.append(subscribed)
        self.connections.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                first = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = first >> 4
                if kind == 1:  # CONNECT
                    present = int(self.session_present)
                    writer.write(bytes([0x20, 3, present, self.connack_code, 0]))
                elif kind == 8:  # SUBSCRIBE: grant QoS 1, or refuse (not authorized)
                    filters = _subscribed_filters(body)
                    self.subscriptions.append(filters)
                    codes = bytes(0x87 if f in self.refuse else 0x01 for f in filters)
                    writer.write(bytes([0x90, 3 + len(codes)]) + body[:2] + b"\x00" + codes)
                    subscribed.set()
                else:
                    packets.append(bytes([first]) + _varint(length) + body)
                    if kind == 12 and self.answer_pings:  # PINGREQ
                        writer.write(b"\xd0\x00")

    async def subscribed(self, connection: int) -> None:
        await wait_for(lambda: len(self._subscribed) > connection, timeout=10)
        await asyncio.wait_for(self._subscribed[connection].wait(), 10)

    def send(self, data: bytes, connection: int = -1) -> None:
        self.connections[connection].write(data)

    def drop(self, connection: int = -1) -> None:
        self.connections[connection].transport.abort()

    def acks(self, connection: int = -1) -> list[int]:
        """Packet ids of the PUBACKs received on ``connection``, in order."""
        return [struct.unpack("!H", p[2:4])[0] for p in self.received[connection] if p[0] == 0x40]


@pytest.fixture
async def broker() -> AsyncIterator[ScriptedBroker]:
    scripted = ScriptedBroker()
    server = await asyncio.start_server(scripted.serve, HOST, 0)
    scripted.port = server.sockets[0].getsockname()[1]
    try:
        yield scripted
    finally:
        for writer in scripted.connections:
            writer.transport.abort()
        server.close()
