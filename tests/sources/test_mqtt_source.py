"""The MQTT source against a scripted broker on loopback: what it stores, when it acknowledges,
what it recognises as a redelivery, and how it pushes back. (The real Mosquitto runs in
tests/e2e; here each packet is under the test's control, and so is durability.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from ha_ingestor.config import load_settings
from ha_ingestor.sources.mqtt import MqttSource
from ha_ingestor.telemetry import Telemetry
from tests.sources.scripted_broker import ScriptedBroker, publish
from tests.support.servers import HOST
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(30)


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
