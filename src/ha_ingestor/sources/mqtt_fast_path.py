"""A fast path for incoming PUBLISH packets, grafted onto gmqtt (pinned to 0.8.x for this).

gmqtt hands every packet through several layers (a ``Package`` tuple, the connection, the
handler's dispatcher with a debug message per packet) and runs an ``async on_message`` as one
Task per message, acknowledging only when it finishes. At tens of thousands of messages per second
those layers cost more than the rest of the pipeline. Here:

- the protocol's packet splitter is replaced: PUBLISH packets are parsed in place, straight from
  the received bytes, and handed to ``on_publish``; every other packet goes to gmqtt as before;
- ``on_publish`` runs synchronously and returns the future of the message's durability (or None):
  the PUBACK/PUBREC is sent from that future's callback — acknowledged after durable, no Task,
  and all acknowledgements of one spool commit in one write.

We never ask for topic aliases, so the broker always sends full topic names.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from time import monotonic
from typing import Any

from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.package import Package

#: (topic, payload, qos, retained, redelivery) → durability future, or None to ack at once
OnPublish = Callable[[str, bytes, int, bool, bool], "asyncio.Future[None] | None"]
#: called with a PUBLISH packet that could not be handled; the stream goes on
OnError = Callable[[Exception], None]

_PUBLISH = 3
_PUBACK = 0x40
_PUBREC = 0x50
_ACK = struct.Struct("!BBH")
_MAX_LENGTH_SHIFT = 21  # a Remaining Length has at most four bytes


class PublishFastPath:
    """Installs the fast path on one gmqtt client (one per connection attempt)."""

    def __init__(self, client: Any, on_publish: OnPublish, on_error: OnError) -> None:
        self._client = client
        self._on_publish = on_publish
        self._on_error = on_error
        self._handler = client._package_handler
        self._state = client._connection_state  # its protocol_version drops to 3.1.1 on fallback
        self._ack_future: asyncio.Future[None] | None = None
        self._ack_queue: list[bytes] | None = None  # the newest acknowledgements not yet sent

    def install_handler(self) -> None:
        """Before connecting: route PUBLISH packets that still go through gmqtt's dispatcher
        (those that arrive before :meth:`install_reader`) to our parser."""
        handler = self._handler
        dispatch = handler._handle_packet

        def handle_packet(cmd: int, packet: bytes) -> None:
            if cmd >> 4 == _PUBLISH:
                self._publish(cmd, packet, 0, len(packet))
                handler._last_msg_in = monotonic()
            else:
                dispatch(cmd, packet)

        handler._handle_packet = handle_packet

    def install_reader(self) -> None:
        """After connecting: split the received bytes into packets ourselves."""
        connection = self._client._connection
        protocol = connection._protocol
        handler = self._handler
        fallback = protocol._read_packet
        publish = self._publish

        def read_packets(data: bytes) -> int:
            """Handle every whole packet in ``data``; return how many bytes were used, or -1
            for a malformed length (gmqtt then drops the connection)."""
            if handler.current_connection is not connection:
                return int(fallback(data))  # superseded: gmqtt discards its packets
            total = len(data)
            parsed = 0
            while total - parsed >= 2:
                index = parsed + 1
                length, shift = 0, 0
                while True:
                    if index >= total:
                        return self._touch(connection, parsed)
                    byte = data[index]
                    index += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > _MAX_LENGTH_SHIFT:
                        return -1
                end = index + length
                if end > total:
                    break
                cmd = data[parsed]
                if cmd >> 4 == _PUBLISH:
                    publish(cmd, data, index, end)
                else:
                    connection.put_package(Package(cmd, data[index:end]))
                parsed = end
            return self._touch(connection, parsed)

        protocol._read_packet = read_packets

    def _touch(self, connection: Any, parsed: int) -> int:
        if parsed:  # data arrived: the keep-alive clock restarts
            connection._last_data_in = self._handler._last_msg_in = monotonic()
        return parsed

    def _publish(self, cmd: int, data: bytes, start: int, end: int) -> None:
        """One PUBLISH packet, whose variable header starts at ``data[start]``."""
        try:
            self._handle_publish(cmd, data, start, end)
        except Exception as exc:  # one bad packet must not stop the reader
            self._on_error(exc)

    def _handle_publish(self, cmd: int, data: bytes, start: int, end: int) -> None:
        qos = (cmd & 0x06) >> 1
        topic_end = start + 2 + ((data[start] << 8) | data[start + 1])
        topic = data[start + 2 : topic_end].decode("utf-8", "replace")
        position = topic_end
        mid = 0
        if qos:
            mid = (data[position] << 8) | data[position + 1]
            position += 2
        if self._state.protocol_version >= MQTTv50:
            # Skip the properties: their length (a variable byte integer), then the bytes.
            length, shift = 0, 0
            while True:
                byte = data[position]
                position += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            position += length
        accepted = self._on_publish(
            topic, data[position:end], qos, bool(cmd & 0x01), bool(cmd & 0x08)
        )
        if qos:
            self._acknowledge(_PUBACK if qos == 1 else _PUBREC, mid, accepted)

    def _acknowledge(self, kind: int, mid: int, durable: asyncio.Future[None] | None) -> None:
        """Queue the PUBACK/PUBREC of one message. It is sent once ``durable`` (shared by the
        messages of one spool commit) resolves, or right after the packets at hand when the
        message is not stored (None) — in the order the messages came, many in one write."""
        packet = _ACK.pack(kind, 2, mid)  # remaining length 2: success, in 3.1.1 and 5 alike
        queue = self._ack_queue
        if queue is not None and (durable is None or durable is self._ack_future):
            queue.append(packet)
            return
        self._ack_queue = queue = [packet]
        self._ack_future = durable
        if durable is None:
            asyncio.get_running_loop().call_soon(self._flush_acks, queue)
        else:
            durable.add_done_callback(lambda _future: self._flush_acks(queue))

    def _flush_acks(self, queue: list[bytes]) -> None:
        if queue is self._ack_queue:  # the newest queue: later messages start a new one
            self._ack_queue = self._ack_future = None
        self._send(b"".join(queue))

    def _send(self, data: bytes) -> None:
        # gmqtt's write_data skips (and logs) a closed connection; the broker resends then.
        self._client._connection._protocol.write_data(data)
