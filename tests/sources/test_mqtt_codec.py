"""The sans-io MQTT codec: streams split anywhere, malformed and random bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ha_ingestor.sources.mqtt_client import codec
from ha_ingestor.sources.mqtt_client.codec import (
    MQTT_5,
    MQTT_311,
    ConnAck,
    ControlPacket,
    Decoder,
    Disconnect,
    PingResp,
    ProtocolError,
    PubRel,
    SubAck,
)
from tests.support.mqtt_publisher import connect_packet

Event = tuple[object, ...]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def publish(
    version: int,
    topic: str,
    payload: bytes,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int = 1,
    properties: bytes = b"",
) -> bytes:
    """A PUBLISH as a broker sends it (written independently of the codec under test)."""
    body = _string(topic.encode())
    if qos:
        body += struct.pack("!H", packet_id)
    if version == MQTT_5:
        body += _varint(len(properties)) + properties
    body += payload
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    return bytes([first]) + _varint(len(body)) + body


class Collector:
    def __init__(self, version: int) -> None:
        self.events: list[Event] = []
        self.decoder = Decoder(self.on_publish, self.on_control, version)

    def on_publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int
    ) -> None:
        self.events.append(("publish", topic, payload, qos, retain, dup, packet_id))

    def on_control(self, packet: ControlPacket) -> None:
        self.events.append(("control", packet))


messages = st.tuples(
    st.text(min_size=1, max_size=20).filter(lambda t: "\x00" not in t),
    st.binary(max_size=300),
    st.integers(0, 2),
    st.booleans(),
    st.booleans(),
    st.integers(1, 65535),
)


def _stream(version: int, items: list[tuple[str, bytes, int, bool, bool, int]]) -> bytes:
    properties = b"\x01\x01\x0b\x05"  # payload format indicator 1, subscription identifier 5
    out = b"\x20\x03\x01\x00\x00" if version == MQTT_5 else b"\x20\x02\x01\x00"  # CONNACK
    for index, (topic, payload, qos, retain, dup, packet_id) in enumerate(items):
        props = properties if version == MQTT_5 and index % 2 else b""
        out += publish(version, topic, payload, qos, retain, dup and qos > 0, packet_id, props)
        if index % 3 == 0:
            out += b"\xd0\x00"  # PINGRESP
    return out


def _expected(version: int, items: list[tuple[str, bytes, int, bool, bool, int]]) -> list[Event]:
    events: list[Event] = [("control", ConnAck(True, 0, {}))]
    for index, (topic, payload, qos, retain, dup, packet_id) in enumerate(items):
        events.append(
            ("publish", topic, payload, qos, retain, dup and qos > 0, packet_id if qos else 0)
        )
        if index % 3 == 0:
            events.append(("control", PingResp()))
    return events


@pytest.mark.parametrize("version", [MQTT_5, MQTT_311])
@settings(max_examples=60, deadline=None)
@given(items=st.lists(messages, min_size=1, max_size=6), data=st.data())
def test_a_stream_split_anywhere_gives_every_packet_once_in_order(
    version: int, items: list[tuple[str, bytes, int, bool, bool, int]], data: st.DataObject
) -> None:
    stream = _stream(version, items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    collector = Collector(version)
    start = 0
    for cut in [*cuts, len(stream)]:
        collector.decoder.feed(stream[start:cut])
        start = cut
    assert collector.events == _expected(version, items)
    assert collector.decoder.buffered == 0


@pytest.mark.parametrize("version", [MQTT_5, MQTT_311])
def test_every_split_of_a_small_stream(version: int) -> None:
    items = [("a/b", b"ON", 1, False, True, 7), ("c", b"", 0, True, False, 1)]
    stream = _stream(version, items)
    for cut in range(len(stream) + 1):
        collector = Collector(version)
        collector.decoder.feed(stream[:cut])
        collector.decoder.feed(stream[cut:])
        assert collector.events == _expected(version, items), cut


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), version=st.sampled_from([MQTT_5, MQTT_311]))
def test_random_bytes_never_crash_only_a_protocol_error(data: bytes, version: int) -> None:
    collector = Collector(version)
    error: ProtocolError | None = None
    try:
        for start in range(0, len(data), 17):
            collector.decoder.feed(data[start : start + 17])
    except ProtocolError as exc:
        error = exc
    assert error is None or str(error)  # any other exception fails the test


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(messages, min_size=1, max_size=3),
    position=st.integers(0, 10_000),
    value=st.integers(0, 255),
    version=st.sampled_from([MQTT_5, MQTT_311]),
)
def test_a_corrupted_byte_gives_valid_packets_or_a_protocol_error(
    items: list[tuple[str, bytes, int, bool, bool, int]], position: int, value: int, version: int
) -> None:
    stream = bytearray(_stream(version, items))
    stream[position % len(stream)] = value
    collector = Collector(version)
    error: ProtocolError | None = None
    try:
        collector.decoder.feed(bytes(stream))
    except ProtocolError as exc:
        error = exc
    # a named error, or valid packets, or a packet announced longer and awaiting its rest
    assert error is not None or collector.events or collector.decoder.buffered


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x30\xff\xff\xff\xff\x01", "malformed remaining length"),
        (b"\x30\x01\x00", "PUBLISH packet too short"),
        (b"\x32\x05\x00\x09abc", "topic longer than the packet"),
        (b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
        (b"\x32\x05\x00\x01a\x00\x00", "packet identifier 0"),
        (b"\x30\x04\x00\x02\xff\xfe", "not valid UTF-8"),
        (b"\x30\x02\x00\x00", "without a topic"),
        (b"\x10\x00", "is not sent to a client"),
        (b"\xd1\x00", "reserved flags"),
        (b"\xd0\x01\x00", "PINGRESP packet with a body"),
        (b"\x90\x02\x00\x01", "SUBACK packet without reason codes"),
        (b"\x62\x01\x00", "PUBREL packet too short"),
    ],
)
def test_malformed_packets_name_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        Collector(MQTT_311).decoder.feed(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x30\x05\x00\x01a\x05\x01", "properties longer than the packet"),
        (b"\x30\x05\x00\x01a\x01\x7f", "unknown property"),
        (b"\x20\x04\x00\x00\x01\x21", "CONNACK packet too short"),
        (b"\x20\x03\x02\x00\x00", "CONNACK packet: reserved flags"),
    ],
)
def test_malformed_mqtt5_packets_name_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        Collector(MQTT_5).decoder.feed(data)


def test_control_packets_are_decoded() -> None:
    collector = Collector(MQTT_5)
    properties = b"\x13\x00\x1e\x1f\x00\x02ok\x26\x00\x01k\x00\x01v"  # keep alive 30, reason
    collector.decoder.feed(
        b"\x20" + _varint(3 + len(properties)) + b"\x00\x00" + _varint(len(properties))
    )
    collector.decoder.feed(properties)
    collector.decoder.feed(b"\x90\x05\x00\x07\x00\x01\x80")  # SUBACK: QoS 1, refused
    collector.decoder.feed(b"\x62\x02\x00\x09")  # PUBREL 9
    collector.decoder.feed(b"\xe0\x01\x8b")  # DISCONNECT: server shutting down
    assert collector.events == [
        ("control", ConnAck(False, 0, {0x13: 30, 0x1F: "ok", 0x26: ("k", "v")})),
        ("control", SubAck(7, [1, 0x80])),
        ("control", PubRel(9)),
        ("control", Disconnect(0x8B, {})),
    ]


def test_a_311_connack_refusing_mqtt5_is_read_on_an_mqtt5_connection() -> None:
    collector = Collector(MQTT_5)
    collector.decoder.feed(b"\x20\x02\x00\x01")
    assert collector.events == [("control", ConnAck(False, 1, {}))]
    assert 1 in codec.UNSUPPORTED_PROTOCOL_VERSION


def test_connect_311_matches_an_independent_encoder() -> None:
    assert codec.encode_connect("id", version=MQTT_311, keepalive=60) == connect_packet("id")
    assert codec.encode_connect(
        "id", version=MQTT_311, keepalive=60, username="u", password="p"
    ) == connect_packet("id", "u", "p")


def test_connect_5_carries_receive_maximum_and_session_expiry() -> None:
    packet = codec.encode_connect(
        "id", version=MQTT_5, clean_start=False, keepalive=30, session_expiry=86400
    )
    properties = b"\x21\xff\xff\x11\x00\x01\x51\x80"
    body = _string(b"MQTT") + b"\x05\x00\x00\x1e" + bytes([len(properties)]) + properties
    body += _string(b"id")
    assert packet == b"\x10" + _varint(len(body)) + body


def test_subscribe_and_acknowledgements() -> None:
    assert codec.encode_subscribe(3, ["a/#", "b"], 1, version=MQTT_5, retain_handling=1) == (
        b"\x82\x0d\x00\x03\x00" + _string(b"a/#") + b"\x11" + _string(b"b") + b"\x11"
    )
    assert codec.encode_subscribe(3, ["a"], 2, version=MQTT_311) == (
        b"\x82\x06\x00\x03" + _string(b"a") + b"\x02"
    )
    assert codec.encode_ack(codec.PUBACK, 258) == b"\x40\x02\x01\x02"
    assert codec.encode_ack(codec.PUBREC, 1) == b"\x50\x02\x00\x01"
    assert codec.encode_ack(codec.PUBCOMP, 1) == b"\x70\x02\x00\x01"
    assert codec.encode_pingreq() == b"\xc0\x00"
    assert codec.encode_disconnect() == b"\xe0\x00"
