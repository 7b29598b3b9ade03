"""The PUBLISH fast path on real MQTT packet bytes, split at every possible place.

The gmqtt objects it is grafted onto are stand-ins with the attributes it uses; the broker side
is covered end to end in tests/e2e.
"""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from ha_ingestor.sources.mqtt_fast_path import PublishFastPath
from tests.support.mqtt_publisher import Message, publish_packet

Received = tuple[str, bytes, int, bool, bool]


class FakeClient:
    """The gmqtt attributes the fast path touches, recording what it does."""

    def __init__(self, protocol_version: int) -> None:
        self.writes: list[bytes] = []
        self.others: list[tuple[int, bytes]] = []
        handler = SimpleNamespace(
            _handle_packet=lambda cmd, packet: self.others.append((cmd, packet)),
            _last_msg_in=0.0,
        )
        self.protocol = SimpleNamespace(
            _read_packet=lambda data: -99, write_data=self.writes.append
        )
        connection = SimpleNamespace(
            _protocol=self.protocol,
            _last_data_in=0.0,
            put_package=lambda package: self.others.append((package.cmd, package.data)),
        )
        handler.current_connection = connection
        self._package_handler = handler
        self._connection = connection
        self._connection_state = SimpleNamespace(protocol_version=protocol_version)

    @property
    def acks(self) -> list[tuple[str, int]]:
        """The PUBACK/PUBREC packets written, in order."""
        data = b"".join(self.writes)
        kinds = {0x40: "puback", 0x50: "pubrec"}
        acks = []
        for i in range(0, len(data), 4):
            kind, length, mid = struct.unpack("!BBH", data[i : i + 4])
            assert length == 2
            acks.append((kinds[kind], mid))
        return acks


def _v5_publish(topic: str, payload: bytes, qos: int, packet_id: int) -> bytes:
    properties = b"\x01\x01" + b"\x03" + struct.pack("!H", 16) + b"application/json"
    body = struct.pack("!H", len(topic.encode())) + topic.encode()
    if qos:
        body += struct.pack("!H", packet_id)
    body += bytes([len(properties)]) + properties + payload
    return bytes([0x30 | qos << 1]) + _length(len(body)) + body


def _length(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _install(
    protocol_version: int, result: Any = None
) -> tuple[FakeClient, list[Received], list[Exception]]:
    client = FakeClient(protocol_version)
    received: list[Received] = []
    errors: list[Exception] = []

    def on_publish(*message: Any) -> Any:
        received.append(message)
        if isinstance(result, Exception):
            raise result
        return result

    path = PublishFastPath(client, on_publish, errors.append)
    path.install_handler()
    path.install_reader()
    return client, received, errors


def _feed(client: FakeClient, data: bytes, cut: int) -> int:
    """Deliver ``data`` in two reads split at ``cut``, as gmqtt's read loop does."""
    first = client.protocol._read_packet(data[:cut])
    assert first >= 0
    rest = data[first:]
    used = client.protocol._read_packet(rest)
    return int(first + used)


MESSAGES = [
    Message("a/b", b"21.5"),
    Message("zigbee2mqtt/k\u00fcche sensor", b'{"temperature":21.5}', qos=1),
    Message("t", b"", qos=0, retain=True),
    Message("big/payload", b"x" * 300, qos=1),  # a two-byte remaining length
]


@pytest.mark.parametrize("version", [MQTTv311, MQTTv50])
async def test_packets_split_anywhere_are_all_delivered_once(version: int) -> None:
    packets = [
        publish_packet(m, packet_id=i + 1)
        if version == MQTTv311
        else _v5_publish(m.topic, m.payload, m.qos, i + 1)
        for i, m in enumerate(MESSAGES)
    ]
    if version == MQTTv50:
        packets[2] = bytes([0x31]) + packets[2][1:]  # retained
    data = b"".join(packets) + b"\xd0\x00"  # and a PINGRESP, which goes to gmqtt
    for cut in range(len(data) + 1):
        client, received, errors = _install(version)
        assert _feed(client, data, cut) == len(data)
        assert received == [
            (m.topic, m.payload, m.qos, m.retain or (version == MQTTv50 and i == 2), False)
            for i, m in enumerate(MESSAGES)
        ]
        await asyncio.sleep(0)
        # QoS 1 not waiting for a commit: acknowledged right after the packets at hand, together.
        assert client.acks == [("puback", 2), ("puback", 4)]
        assert len(client.writes) == 1
        assert client.others == [(0xD0, b"")]
        assert errors == []


async def test_acks_wait_for_durability_keep_their_order_and_go_out_per_commit() -> None:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[None] = loop.create_future()
    second: asyncio.Future[None] = loop.create_future()
    # What the spool answers, message by message: two commits, and one message not stored.
    answers: list[asyncio.Future[None] | None] = [first, first, None, second]
    client = FakeClient(MQTTv311)
    path = PublishFastPath(client, lambda *_: answers.pop(0), lambda exc: None)
    path.install_reader()
    data = publish_packet(Message("a", b"1", qos=1), packet_id=7)
    data += publish_packet(Message("b", b"2", qos=2), packet_id=8)
    data += publish_packet(Message("excluded", b"3", qos=1), packet_id=9)
    data += publish_packet(Message("c", b"4", qos=1), packet_id=10)
    assert client.protocol._read_packet(data) == len(data)
    await asyncio.sleep(0)
    assert client.acks == []  # nothing is durable yet
    first.set_result(None)
    await asyncio.sleep(0)
    # 9 was not stored, but MQTT wants acknowledgements in order: it goes with the first commit.
    assert client.acks == [("puback", 7), ("pubrec", 8), ("puback", 9)]
    assert len(client.writes) == 1
    second.set_result(None)
    await asyncio.sleep(0)
    assert client.acks == [("puback", 7), ("pubrec", 8), ("puback", 9), ("puback", 10)]
    assert len(client.writes) == 2


def test_a_message_that_fails_is_reported_and_the_stream_goes_on() -> None:
    client, received, errors = _install(MQTTv311, RuntimeError("boom"))
    data = b"".join(publish_packet(Message(f"t/{i}", b"x")) for i in range(3))
    assert client.protocol._read_packet(data) == len(data)
    assert [r[0] for r in received] == ["t/0", "t/1", "t/2"]
    assert [str(e) for e in errors] == ["boom"] * 3


def test_a_malformed_remaining_length_is_refused() -> None:
    client, received, _ = _install(MQTTv311)
    assert client.protocol._read_packet(b"\x30\xff\xff\xff\xff\x01") == -1
    assert received == []


async def test_publish_through_gmqtt_dispatch_before_the_reader_is_installed() -> None:
    client, received, _ = _install(MQTTv311)
    packet = publish_packet(Message("early", b"1", qos=1), packet_id=3)
    client._package_handler._handle_packet(packet[0], packet[2:])
    assert received == [("early", b"1", 1, False, False)]
    await asyncio.sleep(0)
    assert client.acks == [("puback", 3)]
