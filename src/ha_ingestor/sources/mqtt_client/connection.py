"""One MQTT subscriber connection over asyncio: CONNECT, SUBSCRIBE, received PUBLISHes handed to
a callback, acknowledgements sent when the caller says so, keep-alive, back-pressure.

Exceptions (all :class:`MqttError`)::

    MqttError
     ├── ProtocolError                 the broker sent something that is not MQTT
     ├── ConnectRefusedError(reason_code)   CONNACK with a refusal
     │    └── UnsupportedProtocolVersionError   … because of the protocol version asked for
     └── ConnectionLostError                the connection ended (or never answered in time)

Reconnecting is the caller's business: a connection object lives for one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ha_ingestor.sources.mqtt_client import codec
from ha_ingestor.sources.mqtt_client.codec import (
    MQTT_5,
    ConnAck,
    ControlPacket,
    Disconnect,
    MqttError,
    OnPublish,
    ProtocolError,
    PubRel,
    SubAck,
)
from ha_ingestor.sources.read_gate import BACK_PRESSURE, ReadGate
from ha_ingestor.sources.stream import open_stream

_ACK = struct.Struct("!BBH")
_ACK_KIND = {1: codec.PUBACK << 4, 2: codec.PUBREC << 4}

#: Reads are not coalesced while this many messages wait for acknowledgement: a broker that
#: limits the messages in flight (Mosquitto: 20 by default) sends more only after them.
_COALESCE_BELOW_UNACKED = 16


def ack_code(qos: int, packet_id: int) -> int:
    """One acknowledgement due, as an int (no tuple per message): the QoS above the 16 bits of
    the packet id."""
    return qos << 16 | packet_id


class ConnectRefusedError(MqttError):
    """The broker answered CONNECT with a refusal."""

    def __init__(self, reason_code: int, reason: str | None = None) -> None:
        self.reason_code = reason_code
        self.reason = reason
        text = f"broker refused the connection (code {reason_code:#04x})"
        super().__init__(f"{text}: {reason}" if reason else text)


class UnsupportedProtocolVersionError(ConnectRefusedError):
    """The broker does not speak the protocol version asked for (fall back to 3.1.1)."""


class ConnectionLostError(MqttError):
    """The connection ended, or the broker did not answer in time."""


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    host: str
    port: int
    client_id: str
    version: int = MQTT_5
    clean_start: bool = True
    session_expiry: int = 0  # MQTT 5; in 3.1.1 a session persists when clean_start is False
    receive_maximum: int = 65535
    keepalive: int = 60
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: ssl.SSLContext | None = None
    timeout: float = 10.0  # for TCP + TLS + CONNACK, and for each SUBACK
    #: At a trickle, read the socket at most this often (seconds, 0 = at once): one wake-up
    #: for several messages instead of one each, for at most that much added latency. A
    #: large read (a burst) is followed by the next one at once.
    read_coalescing: float = 0.0


class MqttConnection:
    """``await connect()``, ``await subscribe(...)``, then messages arrive at ``on_publish``
    (topic, payload, qos, retain, dup, packet_id) until ``wait_closed()`` returns.

    Every QoS 1/2 message must be passed to :meth:`acknowledge` once the caller has it safe;
    a PUBREL (QoS 2, second step) is answered with PUBCOMP by the connection itself."""

    def __init__(
        self,
        options: ConnectOptions,
        on_publish: OnPublish,
        *,
        on_connack: Callable[[bool], None] | None = None,
    ) -> None:
        """``on_connack(session_present)`` runs when the broker accepts, before any PUBLISH
        that follows the CONNACK is handed to ``on_publish``."""
        self.options = options
        self._on_connack = on_connack
        self._on_publish = on_publish
        self._decoder = codec.Decoder(self._publish, self._on_control, options.version)
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._connack: asyncio.Future[ConnAck] = loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._closed: asyncio.Future[None] = loop.create_future()
        self._error: MqttError | None = None
        self._next_packet_id = 0
        self._keepalive = options.keepalive
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._last_in = self._last_out = time.monotonic()
        self._gate = ReadGate(loop, options.read_coalescing)
        self._unacked = 0  # QoS 1/2 messages received and not acknowledged
        self._closing = False  # close() or abort() of ours
        self.session_present = False

    # --- lifecycle -------------------------------------------------------------------------------
    async def connect(self) -> ConnAck:
        options = self.options
        try:
            async with asyncio.timeout(options.timeout):
                await open_stream(
                    options.host,
                    options.port,
                    options.ssl,
                    made=self._made,
                    received=self._received,
                    lost=self._lost,
                )
                self._write(
                    codec.encode_connect(
                        options.client_id,
                        version=options.version,
                        clean_start=options.clean_start,
                        keepalive=options.keepalive,
                        username=options.username,
                        password=options.password,
                        session_expiry=options.session_expiry,
                        receive_maximum=options.receive_maximum,
                    )
                )
                connack = await asyncio.shield(self._connack)
        except TimeoutError:
            self.abort()
            raise ConnectionLostError("the broker did not answer CONNECT in time") from None
        except BaseException:
            self.abort()
            raise
        if connack.reason_code:
            self.abort()
            reason = connack.properties.get(codec.REASON_STRING)
            error = (
                UnsupportedProtocolVersionError
                if connack.reason_code in codec.UNSUPPORTED_PROTOCOL_VERSION
                else ConnectRefusedError
            )
            raise error(connack.reason_code, str(reason) if reason else None)
        self.session_present = connack.session_present
        server_keepalive = connack.properties.get(codec.SERVER_KEEP_ALIVE)
        if isinstance(server_keepalive, int):
            self._keepalive = server_keepalive
        if self._keepalive:
            self._arm_keepalive()
        return connack

    async def close(self) -> None:
        """DISCONNECT (normal) and close; what was written before leaves first."""
        self._closing = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(codec.encode_disconnect(self.options.version))
            transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._closed), 2.0)
        self.abort()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
        self._finish(None)

    async def wait_closed(self) -> MqttError | None:
        """Until the connection ends; the reason it ended, None for a close of ours."""
        await asyncio.shield(self._closed)
        return self._error

    @property
    def closed(self) -> bool:
        return self._closed.done()

    # --- commands --------------------------------------------------------------------------------
    async def subscribe(
        self, filters: list[str], qos: int, *, retain_handling: int = 1
    ) -> list[int]:
        """One SUBSCRIBE for ``filters``; the broker's codes, one per filter (QoS granted, or
        >= 0x80 for a refusal)."""
        packet_id = self._packet_id()
        answer: asyncio.Future[list[int]] = self._loop.create_future()
        self._subacks[packet_id] = answer
        self._write(
            codec.encode_subscribe(
                packet_id,
                filters,
                qos,
                version=self.options.version,
                retain_handling=retain_handling,
            )
        )
        try:
            async with asyncio.timeout(self.options.timeout):
                return await answer  # fails when the connection ends first
        except TimeoutError:
            raise ConnectionLostError("the broker did not answer SUBSCRIBE in time") from None
        finally:
            self._subacks.pop(packet_id, None)

    def acknowledge(self, acks: list[int]) -> bool:
        """Send PUBACK (QoS 1) / PUBREC (QoS 2) for :func:`ack_code` values, in one write.
        False when the connection is gone (the broker then sends those messages again)."""
        if self._transport is None or self._transport.is_closing():
            return False
        pack, kinds = _ACK.pack, _ACK_KIND
        self._write(b"".join([pack(kinds[code >> 16], 2, code & 0xFFFF) for code in acks]))
        self._unacked -= len(acks)
        return True

    def pause_reading(self) -> None:
        """Stop reading the socket (back-pressure): the broker holds what it has not sent."""
        self._gate.pause(BACK_PRESSURE)

    def resume_reading(self) -> None:
        self._gate.resume(BACK_PRESSURE)

    # --- internals -------------------------------------------------------------------------------
    def _packet_id(self) -> int:
        self._next_packet_id = self._next_packet_id % 65535 + 1
        return self._next_packet_id

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise self._error or ConnectionLostError("not connected")
        self._transport.write(data)
        self._last_out = time.monotonic()

    def _made(self, transport: asyncio.Transport) -> None:
        self._transport = self._gate.transport = transport

    def _received(self, data: bytes) -> None:
        self._last_in = time.monotonic()
        try:
            self._decoder.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        except Exception as exc:  # a failing callback must not leave the stream half-read
            self._fail(ConnectionLostError(f"message handler failed: {type(exc).__name__}: {exc}"))
            return
        self._gate.after_read(
            len(data), self._last_in, may_pause=self._unacked < _COALESCE_BELOW_UNACKED
        )

    def _publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int
    ) -> None:
        if qos:
            self._unacked += 1
        self._on_publish(topic, payload, qos, retain, dup, packet_id)

    def _on_control(self, packet: ControlPacket) -> None:
        if isinstance(packet, PubRel):
            self._write(codec.encode_ack(codec.PUBCOMP, packet.packet_id))
        elif isinstance(packet, SubAck):
            answer = self._subacks.get(packet.packet_id)
            if answer is not None and not answer.done():
                answer.set_result(packet.reason_codes)
        elif isinstance(packet, ConnAck):
            if self._connack.done():
                raise ProtocolError("a second CONNACK")
            if packet.reason_code == 0:
                self.session_present = packet.session_present
                if self._on_connack is not None:
                    self._on_connack(packet.session_present)
            self._connack.set_result(packet)
        elif isinstance(packet, Disconnect):
            reason = packet.properties.get(codec.REASON_STRING)
            reason = reason.decode() if isinstance(reason, bytes) else reason
            text = f"broker disconnected (code {packet.reason_code:#04x})"
            self._fail(ConnectionLostError(f"{text}: {reason}" if reason else text))

    def _fail(self, error: MqttError | Exception) -> None:
        if self._error is None:
            self._error = error if isinstance(error, MqttError) else ConnectionLostError(str(error))
        if self._transport is not None:
            self._transport.abort()
        if not self._connack.done():
            self._connack.set_exception(self._error)

    def _lost(self, exc: Exception | None) -> None:
        if self._error is None and (exc is not None or not self._closing):
            self._error = ConnectionLostError(
                str(exc) if exc else "the broker closed the connection"
            )
        if not self._connack.done():
            self._connack.set_exception(self._error or ConnectionLostError("closed"))
        self._finish(self._error)

    def _finish(self, error: MqttError | None) -> None:
        self._gate.close()
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        if not self._connack.done():
            self._connack.set_exception(error or ConnectionLostError("closed"))
            self._connack.exception()  # retrieved: nobody may be waiting any more
        for answer in self._subacks.values():
            if not answer.done():
                answer.set_exception(error or ConnectionLostError("closed"))
        if not self._closed.done():
            self._closed.set_result(None)

    def _arm_keepalive(self) -> None:
        # One wake-up per half keep-alive: a PINGREQ when nothing else went out meanwhile,
        # and the connection is dead when nothing came in for one and a half keep-alives.
        self._keepalive_timer = self._loop.call_later(self._keepalive / 2, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        now = time.monotonic()
        if not self._gate.paused & BACK_PRESSURE and now - self._last_in > self._keepalive * 1.5:
            self._fail(ConnectionLostError("no answer from the broker within the keep-alive"))
            return
        if now - self._last_out >= self._keepalive / 2:
            with contextlib.suppress(MqttError):
                self._write(codec.encode_pingreq())
        self._arm_keepalive()
