"""A small, fast MQTT 3.1.1 publisher on a plain socket, for tests and benchmarks.

Packets are encoded up front and written in large chunks, so publishing is bounded by the
broker, not by this client. QoS 1 and 2 keep a window of unacknowledged messages and wait for every
PUBACK (PUBCOMP) before returning.
"""

from __future__ import annotations

import asyncio
import itertools
import select
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte = length % 128
        length //= 128
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(
    client_id: str, username: str | None = None, password: str | None = None
) -> bytes:
    flags = 0x02
    payload = _string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
        if password is not None:
            flags |= 0x40
            payload += _string(password)
    variable = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", 60)
    body = variable + payload
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(message: Message, packet_id: int = 0) -> bytes:
    header = 0x30 | (message.qos << 1) | (1 if message.retain else 0)
    body = _string(message.topic)
    if message.qos:
        body += struct.pack("!H", packet_id)
    body += message.payload
    return bytes([header]) + _remaining_length(len(body)) + body


class Publisher:
    """One connection; ``publish_many`` returns once the broker has every message."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str = "test-publisher",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._sock = socket.create_connection((host, port), timeout=30)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.sendall(connect_packet(client_id, username, password))
        connack = self._recv_exactly(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"broker refused CONNECT: {connack!r}")
        self._packet_ids = itertools.cycle(range(1, 65536))
        self._pending = b""

    def _recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self._sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    def publish_many(self, messages: Iterable[Message], window: int = 5000) -> int:
        out = bytearray()
        in_flight = 0
        sent = 0
        for message in messages:
            packet_id = next(self._packet_ids) if message.qos else 0
            out += publish_packet(message, packet_id)
            sent += 1
            if message.qos:
                in_flight += 1
            if len(out) >= _CHUNK:
                self._sock.sendall(out)
                out.clear()
            while in_flight >= window:
                in_flight -= self._read_acks(block=True)
            if in_flight:
                in_flight -= self._read_acks(block=False)
        if out:
            self._sock.sendall(out)
        while in_flight > 0:
            in_flight -= self._read_acks(block=True)
        return sent

    def _read_acks(self, block: bool) -> int:
        if not block:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable:
                return 0
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionError("broker closed the connection")
        data = self._pending + data
        # PUBACK / PUBREC / PUBCOMP: <kind> 0x02 <id>; nothing else arrives.
        whole = len(data) - len(data) % 4
        self._pending = data[whole:]
        completed = 0
        for offset in range(0, whole, 4):
            if data[offset] == 0x50:  # PUBREC (QoS 2): release it, its PUBCOMP completes it
                self._sock.sendall(b"\x62\x02" + data[offset + 2 : offset + 4])
            else:
                completed += 1
        return completed

    def close(self) -> None:
        try:
            self._sock.sendall(b"\xe0\x00")  # DISCONNECT
        finally:
            self._sock.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def publish(
    host: str, port: int, topic: str, payload: bytes, qos: int = 0, retain: bool = False
) -> None:
    with Publisher(host, port, client_id=f"test-pub-{id(payload)}") as publisher:
        publisher.publish_many([Message(topic, payload, qos, retain)])


async def publish_many(
    host: str, port: int, messages: Sequence[Message], client_id: str = "test-publisher"
) -> int:
    """Publish from a thread, so an in-process service keeps its event loop."""

    def run() -> int:
        with Publisher(host, port, client_id=client_id) as publisher:
            return publisher.publish_many(messages)

    return await asyncio.to_thread(run)
