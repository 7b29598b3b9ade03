"""MQTT 5 and 3.1.1 packets for a subscriber, without I/O (sans-io).

Encoding: the packets a subscriber sends (CONNECT, SUBSCRIBE, PUBACK, PUBREC, PUBCOMP, PINGREQ,
DISCONNECT). Decoding: :class:`Decoder` takes received bytes in pieces of any size and hands
back whole packets; PUBLISH packets are parsed in place, straight from the received bytes, and
given to a callback — the hot path of the source, so no object is made per message.

Anything that is not valid MQTT raises :class:`ProtocolError` with what is wrong; the connection
cannot go on after that (the stream's framing is lost), so the transport drops it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

MQTT_5: Final = 5
MQTT_311: Final = 4

CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
PUBREC: Final = 5
PUBREL: Final = 6
PUBCOMP: Final = 7
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14
AUTH: Final = 15

#: CONNACK codes meaning "this broker does not speak the protocol version asked for":
#: 0x01 in MQTT 3.1.1 (a 3.1.1 broker answers an MQTT 5 CONNECT so), 0x84 in MQTT 5.
UNSUPPORTED_PROTOCOL_VERSION: Final = frozenset({0x01, 0x84})

MAX_REMAINING_LENGTH: Final = 268_435_455  # four bytes of a Variable Byte Integer

_U16 = struct.Struct("!H")
_ACK = struct.Struct("!BBH")
_PINGREQ = b"\xc0\x00"

#: (topic, payload, qos, retain, dup, packet_id) of one received PUBLISH
OnPublish = Callable[[str, bytes, int, bool, bool, int], None]
#: every other packet, in the order received
OnControl = Callable[["ControlPacket"], None]


class MqttError(Exception):
    """Base of the errors of this client (the tree is drawn in ``connection``)."""


class ProtocolError(MqttError):
    """Bytes from the peer that are not a valid MQTT packet."""


# --- properties (MQTT 5, section 2.2.2.2) ------------------------------------------------------
_BYTE, _U16_T, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES: Final = {
    0x01: _BYTE,  # payload format indicator
    0x02: _U32,  # message expiry interval
    0x03: _UTF8,  # content type
    0x08: _UTF8,  # response topic
    0x09: _BINARY,  # correlation data
    0x0B: _VARINT,  # subscription identifier
    0x11: _U32,  # session expiry interval
    0x12: _UTF8,  # assigned client identifier
    0x13: _U16_T,  # server keep alive
    0x15: _UTF8,  # authentication method
    0x16: _BINARY,  # authentication data
    0x17: _BYTE,  # request problem information
    0x18: _U32,  # will delay interval
    0x19: _BYTE,  # request response information
    0x1A: _UTF8,  # response information
    0x1C: _UTF8,  # server reference
    0x1F: _UTF8,  # reason string
    0x21: _U16_T,  # receive maximum
    0x22: _U16_T,  # topic alias maximum
    0x23: _U16_T,  # topic alias
    0x24: _BYTE,  # maximum qos
    0x25: _BYTE,  # retain available
    0x26: _PAIR,  # user property
    0x27: _U32,  # maximum packet size
    0x28: _BYTE,  # wildcard subscription available
    0x29: _BYTE,  # subscription identifier available
    0x2A: _BYTE,  # shared subscription available
}
SESSION_EXPIRY_INTERVAL: Final = 0x11
ASSIGNED_CLIENT_IDENTIFIER: Final = 0x12
SERVER_KEEP_ALIVE: Final = 0x13
REASON_STRING: Final = 0x1F
RECEIVE_MAXIMUM: Final = 0x21
TOPIC_ALIAS: Final = 0x23
USER_PROPERTY: Final = 0x26

PropertyValue = int | str | bytes | tuple[str, str]


@dataclass(frozen=True, slots=True)
class ConnAck:
    session_present: bool
    reason_code: int  # 0 = accepted; 3.1.1 return codes and MQTT 5 reason codes as sent
    properties: dict[int, PropertyValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    reason_codes: list[int]  # per filter: the granted QoS, or >= 0x80 for a refusal


@dataclass(frozen=True, slots=True)
class PubRel:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int
    properties: dict[int, PropertyValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ignored:
    """A valid packet a subscriber has no use for (PUBACK, PUBCOMP, UNSUBACK, AUTH)."""

    kind: int


ControlPacket = ConnAck | SubAck | PubRel | PingResp | Disconnect | Ignored


# --- encoding ----------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _string(text: str) -> bytes:
    return _binary(text.encode())


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("an MQTT string holds at most 65535 bytes")
    return _U16.pack(len(data)) + data


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + _varint(len(body)) + body


def encode_connect(
    client_id: str,
    *,
    version: int = MQTT_5,
    clean_start: bool = True,
    keepalive: int = 60,
    username: str | None = None,
    password: str | None = None,
    session_expiry: int = 0,
    receive_maximum: int = 65535,
) -> bytes:
    flags = 0x02 if clean_start else 0
    payload = _string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _string(password)
    variable = _string("MQTT") + bytes([version, flags]) + _U16.pack(keepalive)
    if version == MQTT_5:
        properties = bytes([RECEIVE_MAXIMUM]) + _U16.pack(receive_maximum)
        if session_expiry:
            properties += bytes([SESSION_EXPIRY_INTERVAL]) + struct.pack("!I", session_expiry)
        variable += _varint(len(properties)) + properties
    return _packet(CONNECT << 4, variable + payload)


def encode_subscribe(
    packet_id: int,
    filters: list[str],
    qos: int,
    *,
    version: int = MQTT_5,
    retain_handling: int = 1,
) -> bytes:
    """``retain_handling`` 1: retained messages are sent only for a subscription that is new,
    so a resumed session does not replay them (MQTT 5; 3.1.1 always replays)."""
    options = qos
    body = _U16.pack(packet_id)
    if version == MQTT_5:
        options |= retain_handling << 4
        body += b"\x00"  # no properties
    for topic_filter in filters:
        body += _string(topic_filter) + bytes([options])
    return _packet(SUBSCRIBE << 4 | 0x02, body)


def encode_ack(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC or PUBCOMP with success: remaining length 2 in 3.1.1 and 5 alike."""
    return _ACK.pack(kind << 4, 2, packet_id)


def encode_pingreq() -> bytes:
    return _PINGREQ


def encode_disconnect(version: int = MQTT_5) -> bytes:
    # MQTT 5 with reason 0 (normal) may omit the reason code: the same two bytes as 3.1.1.
    return bytes([DISCONNECT << 4, 0])


# --- decoding ----------------------------------------------------------------------------------
class _Cursor:
    """Reads the fields of one packet body, raising ProtocolError past its end."""

    __slots__ = ("data", "end", "kind", "position")

    def __init__(self, data: bytes, start: int, end: int, kind: str) -> None:
        self.data = data
        self.position = start
        self.end = end
        self.kind = kind

    def remaining(self) -> int:
        return self.end - self.position

    def _take(self, size: int) -> int:
        start = self.position
        if start + size > self.end:
            raise ProtocolError(f"{self.kind} packet too short")
        self.position = start + size
        return start

    def byte(self) -> int:
        return self.data[self._take(1)]

    def u16(self) -> int:
        start = self._take(2)
        return (self.data[start] << 8) | self.data[start + 1]

    def u32(self) -> int:
        start = self._take(4)
        return int.from_bytes(self.data[start : start + 4], "big")

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 21:
                raise ProtocolError(f"{self.kind} packet: malformed variable byte integer")

    def binary(self) -> bytes:
        size = self.u16()
        start = self._take(size)
        return self.data[start : start + size]

    def utf8(self) -> str:
        try:
            return self.binary().decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.kind} packet: a string is not valid UTF-8") from None

    def properties(self) -> dict[int, PropertyValue]:
        length = self.varint()
        end = self.position + length
        if end > self.end:
            raise ProtocolError(f"{self.kind} packet: properties longer than the packet")
        outer_end, self.end = self.end, end
        found: dict[int, PropertyValue] = {}
        try:
            while self.position < end:
                identifier = self.varint()
                kind = _PROPERTY_TYPES.get(identifier)
                value: PropertyValue
                if kind is None:
                    raise ProtocolError(f"{self.kind} packet: unknown property {identifier:#x}")
                if kind == _BYTE:
                    value = self.byte()
                elif kind == _U16_T:
                    value = self.u16()
                elif kind == _U32:
                    value = self.u32()
                elif kind == _VARINT:
                    value = self.varint()
                elif kind == _UTF8:
                    value = self.utf8()
                elif kind == _BINARY:
                    value = self.binary()
                else:
                    value = (self.utf8(), self.utf8())
                found.setdefault(identifier, value)  # user properties: the first is enough
        finally:
            self.end = outer_end
        return found

    def done(self) -> None:
        if self.position != self.end:
            raise ProtocolError(f"{self.kind} packet: unexpected bytes at its end")


class Decoder:
    """Splits a received byte stream into packets. ``feed`` takes bytes as they arrive (split
    anywhere) and calls ``on_publish`` for each PUBLISH, ``on_control`` for every other packet,
    in the order they came.

    ``version`` is the protocol of the connection; it may be set once the CONNACK is read (a
    3.1.1 broker answers an MQTT 5 CONNECT in 3.1.1 form, which :meth:`_connack` accepts)."""

    def __init__(self, on_publish: OnPublish, on_control: OnControl, version: int = MQTT_5) -> None:
        self._on_publish = on_publish
        self._on_control = on_control
        self.version = version
        self._rest = b""

    def feed(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
        on_control = self._on_control
        total = len(data)
        parsed = 0
        on_publish = self._on_publish
        v5 = self.version == MQTT_5
        try:
            while total - parsed >= 2:
                index = parsed + 1
                length, shift, complete = 0, 0, False
                while index < total:
                    byte = data[index]
                    index += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        complete = True
                        break
                    shift += 7
                    if shift > 21:
                        raise ProtocolError("malformed remaining length")
                if not complete:
                    break  # the length itself is not complete yet
                end = index + length
                if end > total:
                    break
                first = data[parsed]
                if first >> 4 == PUBLISH:
                    self._publish(first, data, index, end, v5, on_publish)
                else:
                    on_control(self._control(first, data, index, end))
                parsed = end
        finally:
            self._rest = data[parsed:]

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet held for the next ``feed``."""
        return len(self._rest)

    @staticmethod
    def _publish(
        first: int, data: bytes, start: int, end: int, v5: bool, on_publish: OnPublish
    ) -> None:
        qos = (first >> 1) & 0x03
        if qos == 3:
            raise ProtocolError("PUBLISH packet with QoS 3")
        if end - start < 2:
            raise ProtocolError("PUBLISH packet too short")
        topic_end = start + 2 + ((data[start] << 8) | data[start + 1])
        position = topic_end + (2 if qos else 0)
        if position > end:
            raise ProtocolError("PUBLISH packet: topic longer than the packet")
        try:
            topic = data[start + 2 : topic_end].decode()
        except UnicodeDecodeError:
            raise ProtocolError("PUBLISH packet: topic is not valid UTF-8") from None
        packet_id = 0
        if qos:
            packet_id = (data[topic_end] << 8) | data[topic_end + 1]
            if not packet_id:
                raise ProtocolError("PUBLISH packet with packet identifier 0")
        if v5:
            if position < end and data[position] == 0:  # the usual case: no properties
                position += 1
            else:
                cursor = _Cursor(data, position, end, "PUBLISH")
                properties = cursor.properties()
                position = cursor.position
                if not topic and TOPIC_ALIAS in properties:
                    raise ProtocolError("PUBLISH packet uses a topic alias, none was allowed")
        if not topic:
            raise ProtocolError("PUBLISH packet without a topic")
        on_publish(
            topic, data[position:end], qos, bool(first & 0x01), bool(first & 0x08), packet_id
        )

    def _control(self, first: int, data: bytes, start: int, end: int) -> ControlPacket:
        kind, flags = first >> 4, first & 0x0F
        expected_flags = 0x02 if kind == PUBREL else 0
        if flags != expected_flags:
            raise ProtocolError(f"packet type {kind}: reserved flags {flags:#x}")
        if kind == CONNACK:
            return self._connack(_Cursor(data, start, end, "CONNACK"))
        if kind == SUBACK:
            cursor = _Cursor(data, start, end, "SUBACK")
            packet_id = cursor.u16()
            if self.version == MQTT_5:
                cursor.properties()
            codes = list(data[cursor.position : end])
            if not codes:
                raise ProtocolError("SUBACK packet without reason codes")
            return SubAck(packet_id, codes)
        if kind in (PUBREL, PUBACK, PUBREC, PUBCOMP):
            cursor = _Cursor(data, start, end, "PUBREL" if kind == PUBREL else "acknowledgement")
            packet_id = cursor.u16()
            if self.version == MQTT_5 and cursor.remaining():
                cursor.byte()
                if cursor.remaining():
                    cursor.properties()
            cursor.done()
            return PubRel(packet_id) if kind == PUBREL else Ignored(kind)
        if kind == PINGRESP:
            if end != start:
                raise ProtocolError("PINGRESP packet with a body")
            return PingResp()
        if kind == DISCONNECT:
            cursor = _Cursor(data, start, end, "DISCONNECT")
            reason, properties = 0, {}
            if cursor.remaining():
                reason = cursor.byte()
                if cursor.remaining():
                    properties = cursor.properties()
            cursor.done()
            return Disconnect(reason, properties)
        if kind in (UNSUBACK, AUTH):
            return Ignored(kind)
        raise ProtocolError(f"packet type {kind} is not sent to a client")

    def _connack(self, cursor: _Cursor) -> ConnAck:
        flags = cursor.byte()
        if flags & 0xFE:
            raise ProtocolError("CONNACK packet: reserved flags set")
        code = cursor.byte()
        properties: dict[int, PropertyValue] = {}
        # A 3.1.1 broker refusing an MQTT 5 CONNECT answers in 3.1.1 form: no properties.
        if self.version == MQTT_5 and cursor.remaining():
            properties = cursor.properties()
        cursor.done()
        return ConnAck(bool(flags & 0x01), code, properties)
