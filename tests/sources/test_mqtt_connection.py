"""The MQTT connection on its own: keep-alive, QoS 2's second step, refusals."""

from __future__ import annotations

import asyncio

import pytest

from ha_ingestor.sources.mqtt_client import (
    ConnectionLostError,
    ConnectOptions,
    ConnectRefusedError,
    MqttConnection,
)
from tests.sources.scripted_broker import ScriptedBroker
from tests.support.servers import HOST
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(30)


def _connection(broker: ScriptedBroker, keepalive: int = 60) -> MqttConnection:
    options = ConnectOptions(HOST, broker.port, "test-client", keepalive=keepalive)
    return MqttConnection(options, lambda *_: None)


def _pings(broker: ScriptedBroker) -> int:
    return broker.received[0].count(b"\xc0\x00")


async def test_an_idle_connection_pings_and_answered_pings_keep_it(
    broker: ScriptedBroker,
) -> None:
    connection = _connection(broker, keepalive=1)
    await connection.connect()
    try:
        await wait_for(lambda: _pings(broker) >= 3, timeout=10, message="three PINGREQs")
        assert not connection.closed
    finally:
        await connection.close()


async def test_a_broker_silent_for_the_keepalive_is_given_up(broker: ScriptedBroker) -> None:
    broker.answer_pings = False
    connection = _connection(broker, keepalive=1)
    await connection.connect()
    error = await asyncio.wait_for(connection.wait_closed(), 10)
    assert isinstance(error, ConnectionLostError)
    assert "keep-alive" in str(error)
    assert _pings(broker) >= 1


async def test_pubrel_is_answered_with_pubcomp(broker: ScriptedBroker) -> None:
    connection = _connection(broker)
    await connection.connect()
    try:
        broker.send(b"\x62\x02\x01\x05")  # PUBREL for packet 261
        await wait_for(lambda: b"\x70\x02\x01\x05" in broker.received[0], timeout=5)
    finally:
        await connection.close()


async def test_a_refused_connect_carries_the_reason_code(broker: ScriptedBroker) -> None:
    broker.connack_code = 0x86  # bad user name or password
    connection = _connection(broker)
    with pytest.raises(ConnectRefusedError, match="0x86") as refused:
        await connection.connect()
    assert refused.value.reason_code == 0x86
    assert connection.closed


async def test_a_malformed_packet_closes_with_a_protocol_error(broker: ScriptedBroker) -> None:
    connection = _connection(broker)
    await connection.connect()
    broker.send(b"\x30\xff\xff\xff\xff\x01")
    error = await asyncio.wait_for(connection.wait_closed(), 5)
    assert error is not None
    assert "malformed remaining length" in str(error)
