"""The MQTT source against a scripted broker on loopback: what it stores, when it acknowledges,
what it recognises as a redelivery, and how it pushes back. (The real Mosquitto runs in
tests/e2e; here each packet is under the test's control, and so is durability.)"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from ha_ingestor.config import load_settings
from ha_ingestor.sources.mqtt import MqttSource
from ha_ingestor.telemetry import Telemetry
from tests.support.servers import HOST
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(30)


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


class ScriptedBroker:
    """Accepts connections, answers CONNACK (session present or not) and SUBACK, sends what the
    test hands it, and records the acknowledgements per connection."""

    def __init__(self) -> None:
        self.session_present = False
        self.connections: list[asyncio.StreamWriter] = []
        self.received: list[list[bytes]] = []  # per connection: packets from the client
        self.port = 0
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
                    writer.write(bytes([0x20, 3, int(self.session_present), 0, 0]))
                elif kind == 8:  # SUBSCRIBE: grant every filter QoS 1
                    filters = body.count(b"\x11")
                    writer.write(
                        bytes([0x90, 3 + filters]) + body[:2] + b"\x00" + b"\x01" * filters
                    )
                    subscribed.set()
                else:
                    packets.append(bytes([first]) + _varint(length) + body)

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


class ControlledBuffer:
    """A Buffer whose lines become durable when the test says so (one future per commit)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.future: asyncio.Future[None] | None = None
        self.is_full = False
        self.room = asyncio.Event()

    def add(self, line: str) -> asyncio.Future[None]:
        self.lines.append(line)
        if self.future is None:
            self.future = asyncio.get_running_loop().create_future()
        return self.future

    def commit(self) -> None:
        assert self.future is not None
        self.future.set_result(None)
        self.future = None

    def full(self) -> bool:
        return self.is_full

    async def wait_for_room(self) -> None:
        await self.room.wait()

    def payloads(self) -> list[str]:
        return [line.split('payload="', 1)[1].split('"', 1)[0] for line in self.lines]


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


@pytest.fixture
async def running(
    broker: ScriptedBroker,
) -> AsyncIterator[tuple[ControlledBuffer, CollectorRegistry]]:
    settings = load_settings(
        {
            "HA_INGESTOR_MQTT_HOST": HOST,
            "HA_INGESTOR_MQTT_PORT": str(broker.port),
            "HA_INGESTOR_MQTT_TOPICS": "t/#",
            "HA_INGESTOR_MQTT_EXCLUDE_TOPICS": "t/excluded",
            "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:1",
        }
    )
    buffer = ControlledBuffer()
    registry = CollectorRegistry()
    source = MqttSource(settings, buffer, Telemetry(registry), "test")  # type: ignore[arg-type]
    task = asyncio.create_task(source.run())
    try:
        await broker.subscribed(0)
        yield buffer, registry
    finally:
        if buffer.future is not None:
            buffer.commit()  # else shutdown waits for it, as for a real commit
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def dropped(registry: CollectorRegistry, reason: str) -> float:
    labels = {"reason": reason, "intentional": "true"}
    return registry.get_sample_value("ha_ingestor_events_dropped_total", labels) or 0.0


async def test_acknowledged_after_durable_in_order_one_write_per_commit(
    broker: ScriptedBroker, running: tuple[ControlledBuffer, CollectorRegistry]
) -> None:
    buffer, _ = running
    broker.send(publish("t/a", b"1", 1) + publish("t/b", b"2", 2))
    await wait_for(lambda: len(buffer.lines) == 2, timeout=5)
    await asyncio.sleep(0.05)  # a moment in which nothing may be acknowledged
    assert broker.acks() == []
    buffer.commit()
    broker.send(publish("t/c", b"3", 3) + publish("t/excluded", b"x", 4))
    await wait_for(lambda: broker.acks() == [1, 2], timeout=5)
    await wait_for(lambda: len(buffer.lines) == 3, timeout=5)
    buffer.commit()
    # The excluded message is acknowledged after the one before it, not ahead of it.
    await wait_for(lambda: broker.acks() == [1, 2, 3, 4], timeout=5)


async def test_an_unacknowledged_message_sent_again_is_stored_once(
    broker: ScriptedBroker, running: tuple[ControlledBuffer, CollectorRegistry]
) -> None:
    buffer, registry = running
    broker.send(publish("t/switch", b"ON", 7))
    await wait_for(lambda: len(buffer.lines) == 1, timeout=5)
    broker.session_present = True
    broker.drop()
    await broker.subscribed(1)
    broker.send(publish("t/switch", b"ON", 7, dup=True), connection=1)
    await wait_for(lambda: dropped(registry, "duplicate_redelivery") == 1, timeout=5)
    assert broker.acks(1) == []  # its first copy is not durable yet
    buffer.commit()
    await wait_for(lambda: broker.acks(1) == [7], timeout=5)
    assert buffer.payloads() == ["ON"]
    received = ("ha_ingestor_events_received_total", {"source": "mqtt"})
    await wait_for(lambda: registry.get_sample_value(*received) == 2, timeout=5)  # both copies


async def test_a_message_sent_again_after_its_acknowledgement_left_is_stored(
    broker: ScriptedBroker, running: tuple[ControlledBuffer, CollectorRegistry]
) -> None:
    buffer, registry = running
    broker.send(publish("t/switch", b"ON", 7))
    await wait_for(lambda: len(buffer.lines) == 1, timeout=5)
    buffer.commit()
    await wait_for(lambda: broker.acks() == [7], timeout=5)
    broker.session_present = True
    broker.drop()
    await broker.subscribed(1)
    # Packet id 7 was free again: a DUP with it is another message, equal payload or not.
    broker.send(publish("t/switch", b"ON", 7, dup=True), connection=1)
    await wait_for(lambda: len(buffer.lines) == 2, timeout=5)
    assert dropped(registry, "duplicate_redelivery") == 0
    assert buffer.payloads() == ["ON", "ON"]


async def test_a_new_session_forgets_the_previous_connection(
    broker: ScriptedBroker, running: tuple[ControlledBuffer, CollectorRegistry]
) -> None:
    buffer, registry = running
    broker.send(publish("t/switch", b"OFF", 9))
    await wait_for(lambda: len(buffer.lines) == 1, timeout=5)
    broker.session_present = False
    broker.drop()
    await broker.subscribed(1)
    broker.send(publish("t/switch", b"OFF", 9, dup=True), connection=1)
    await wait_for(lambda: len(buffer.lines) == 2, timeout=5)
    assert dropped(registry, "duplicate_redelivery") == 0


async def test_a_dup_with_another_topic_is_not_taken_for_the_first_copy(
    broker: ScriptedBroker, running: tuple[ControlledBuffer, CollectorRegistry]
) -> None:
    buffer, registry = running
    broker.send(publish("t/one", b"ON", 3))
    await wait_for(lambda: len(buffer.lines) == 1, timeout=5)
    broker.session_present = True
    broker.drop()
    await broker.subscribed(1)
    broker.send(publish("t/other", b"ON", 3, dup=True), connection=1)
    await wait_for(lambda: len(buffer.lines) == 2, timeout=5)
    assert dropped(registry, "duplicate_redelivery") == 0


async def test_a_full_buffer_stops_reading_until_there_is_room(
    broker: ScriptedBroker, running: tuple[ControlledBuffer, CollectorRegistry]
) -> None:
    buffer, _ = running
    buffer.is_full = True
    broker.send(publish("t/a", b"1", 1))
    await wait_for(lambda: len(buffer.lines) == 1, timeout=5)
    broker.send(publish("t/a", b"2", 2))
    await asyncio.sleep(0.3)  # reading is paused: the second message must stay unread
    assert len(buffer.lines) == 1
    buffer.is_full = False
    buffer.room.set()
    await wait_for(lambda: len(buffer.lines) == 2, timeout=5)


async def test_retained_replays_are_acknowledged_without_being_stored(
    broker: ScriptedBroker, running: tuple[ControlledBuffer, CollectorRegistry]
) -> None:
    buffer, registry = running
    broker.send(publish("t/r", b"21.5", 1, retain=True))
    await wait_for(lambda: len(buffer.lines) == 1, timeout=5)
    buffer.commit()
    broker.send(publish("t/r", b"21.5", 2, retain=True))  # the same value replayed
    await wait_for(lambda: broker.acks() == [1, 2], timeout=5)
    assert len(buffer.lines) == 1
    assert dropped(registry, "retained_replay") == 1
