"""The client side of WebSocket (RFC 6455), sans I/O: the opening handshake, frames in and out.

No extension is offered (Home Assistant's compression is optional), so every frame with a
reserved bit set is an error. Text and binary messages may arrive in fragments, with control
frames between them; control frames are never fragmented and carry at most 125 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from collections.abc import Callable

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = frozenset((TEXT, BINARY))
_CONTROL = frozenset((CLOSE, PING, PONG))
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEADER_BYTES = 64 * 1024
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")

#: A message handed on: (opcode TEXT or BINARY, its payload).
OnMessage = Callable[[int, bytes], None]
#: A control frame handed on: (opcode CLOSE, PING or PONG, its payload).
OnControl = Callable[[int, bytes], None]


class WebSocketError(ConnectionError):
    """The WebSocket connection cannot go on."""


class HandshakeError(WebSocketError):
    """The server did not switch to WebSocket as asked."""


class ProtocolError(WebSocketError):
    """The server sent something that is not a valid WebSocket frame."""


# --- opening handshake ----------------------------------------------------------------------------
def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def accept_for(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer ``key`` with."""
    digest = hashlib.sha1(key.encode() + _GUID, usedforsecurity=False).digest()  # RFC 6455
    return base64.b64encode(digest).decode()


def handshake_request(host: str, resource: str, key: str, user_agent: str) -> bytes:
    """``host`` as the Host header wants it (``name:port`` when the port is not the default)."""
    return (
        f"GET {resource} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"User-Agent: {user_agent}\r\n"
        "\r\n"
    ).encode()


class HandshakeReader:
    """Collects the server's answer to the opening handshake."""

    def __init__(self, key: str) -> None:
        self._accept = accept_for(key)
        self._buffer = bytearray()

    def feed(self, data: bytes) -> bytes | None:
        """None until the answer is complete; then the bytes after it (the first frames).
        Raises :class:`HandshakeError` for any answer but a valid ``101``."""
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEADER_BYTES:
                raise HandshakeError("the server's answer has no end of headers")
            return None
        head = bytes(self._buffer[:end]).decode("latin-1")
        rest = bytes(self._buffer[end + 4 :])
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise HandshakeError(f"not an HTTP answer: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if parts[1] != "101":
            reason = parts[2] if len(parts) > 2 else ""
            raise HandshakeError(f"the server answered HTTP {parts[1]} {reason}".rstrip())
        if headers.get("upgrade", "").lower() != "websocket":
            raise HandshakeError("the server's 101 answer does not upgrade to websocket")
        if headers.get("sec-websocket-accept") != self._accept:
            raise HandshakeError("the server's Sec-WebSocket-Accept does not match the key")
        if headers.get("sec-websocket-extensions"):
            raise HandshakeError(
                f"the server chose an extension that was not offered: "
                f"{headers['sec-websocket-extensions']}"
            )
        return rest


# --- frames out -----------------------------------------------------------------------------------
def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame, masked as a client must (``mask``: 4 bytes, random if None)."""
    mask = os.urandom(4) if mask is None else mask
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + _U16.pack(length)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + _U64.pack(length)
    return head + mask + apply_mask(payload, mask)


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the repeated 4-byte ``mask`` (masking and unmasking are the same)."""
    if not payload:
        return b""
    length = len(payload)
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        length, "little"
    )


def encode_close(code: int = 1000, reason: str = "") -> bytes:
    return encode_frame(CLOSE, _U16.pack(code) + reason.encode()[:123])


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """A close frame's (status code, reason); code None when the frame carries none."""
    if len(payload) < 2:
        return None, ""
    return _U16.unpack_from(payload)[0], payload[2:].decode("utf-8", "replace")


# --- frames in ------------------------------------------------------------------------------------
class Decoder:
    """Splits the server's bytes into messages and control frames, whatever their cuts."""

    def __init__(self, on_message: OnMessage, on_control: OnControl, max_size: int) -> None:
        self._on_message = on_message
        self._on_control = on_control
        self._max_size = max_size
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragments_size = 0
        self._fragmented_opcode: int | None = None

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        try:
            while True:
                frame = self._frame(buffer, start)
                if frame is None:
                    break
                start, first, payload = frame
                self._dispatch(first, payload)
        finally:
            del buffer[:start]

    def _frame(self, buffer: bytearray, start: int) -> tuple[int, int, bytes] | None:
        """(where the next frame starts, its first byte, its payload), or None if incomplete."""
        available = len(buffer) - start
        if available < 2:
            return None
        first, second = buffer[start], buffer[start + 1]
        if second & 0x80:
            raise ProtocolError("the server sent a masked frame")
        if first & 0x70:
            raise ProtocolError("a frame with a reserved bit set (no extension was agreed)")
        length = second & 0x7F
        offset = start + 2
        if length == 126:
            if available < 4:
                return None
            length = _U16.unpack_from(buffer, offset)[0]
            offset += 2
        elif length == 127:
            if available < 10:
                return None
            length = _U64.unpack_from(buffer, offset)[0]
            if length >> 63:
                raise ProtocolError("a frame length with the most significant bit set")
            offset += 8
        if length > self._max_size:
            raise ProtocolError(f"a frame of {length} bytes, over the limit of {self._max_size}")
        end = offset + length
        if end > len(buffer):
            return None
        return end, first, bytes(buffer[offset:end])

    def _dispatch(self, first: int, payload: bytes) -> None:
        final, opcode = bool(first & 0x80), first & 0x0F
        if opcode in _CONTROL:
            if not final or len(payload) > 125:
                raise ProtocolError("a fragmented or oversized control frame")
            self._on_control(opcode, payload)
            return
        if opcode in _DATA:
            if self._fragmented_opcode is not None:
                raise ProtocolError("a new message began before the fragmented one ended")
            if final:
                self._on_message(opcode, payload)
                return
            self._fragmented_opcode = opcode
        elif opcode != CONTINUATION:
            raise ProtocolError(f"unknown opcode {opcode:#x}")
        elif self._fragmented_opcode is None:
            raise ProtocolError("a continuation frame without a message to continue")
        self._fragments.append(payload)
        self._fragments_size += len(payload)
        if self._fragments_size > self._max_size:
            raise ProtocolError(f"a message of over {self._max_size} bytes, the limit")
        if final:
            message_opcode, message = self._fragmented_opcode, b"".join(self._fragments)
            self._fragmented_opcode, self._fragments, self._fragments_size = None, [], 0
            self._on_message(message_opcode, message)
