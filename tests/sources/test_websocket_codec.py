"""The sans-io WebSocket codec: the handshake, frames split anywhere, malformed and random bytes."""

from __future__ import annotations

import contextlib
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ha_ingestor.sources.websocket import codec
from ha_ingestor.sources.websocket.codec import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    Decoder,
    HandshakeError,
    HandshakeReader,
    ProtocolError,
)

LIMIT = 1 << 20


def server_frame(opcode: int, payload: bytes, final: bool = True, rsv: int = 0) -> bytes:
    """A frame as a server sends it (unmasked), written independently of the codec."""
    first = (0x80 if final else 0) | rsv << 4 | opcode
    length = len(payload)
    if length < 126:
        return struct.pack("!BB", first, length) + payload
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length) + payload
    return struct.pack("!BBQ", first, 127, length) + payload


class Recorder:
    def __init__(self, max_size: int = LIMIT) -> None:
        self.events: list[tuple[str, int, bytes]] = []
        self.decoder = Decoder(self.message, self.control, max_size)

    def message(self, opcode: int, payload: bytes) -> None:
        self.events.append(("message", opcode, payload))

    def control(self, opcode: int, payload: bytes) -> None:
        self.events.append(("control", opcode, payload))


STREAM = b"".join(
    [
        server_frame(TEXT, b'{"type":"auth_required"}'),
        server_frame(TEXT, b"x" * 300),  # 16-bit length
        server_frame(PING, b"are you there"),
        server_frame(TEXT, b"first ", final=False),  # a fragmented message ...
        server_frame(PING, b""),  # ... with a control frame between its fragments
        server_frame(CONTINUATION, b"second ", final=False),
        server_frame(CONTINUATION, b"third"),
        server_frame(BINARY, bytes(range(256)) * 300),  # 64-bit length
        server_frame(TEXT, b""),
        server_frame(CLOSE, struct.pack("!H", 1001) + b"going away"),
    ]
)
EXPECTED = [
    ("message", TEXT, b'{"type":"auth_required"}'),
    ("message", TEXT, b"x" * 300),
    ("control", PING, b"are you there"),
    ("control", PING, b""),
    ("message", TEXT, b"first second third"),
    ("message", BINARY, bytes(range(256)) * 300),
    ("message", TEXT, b""),
    ("control", CLOSE, struct.pack("!H", 1001) + b"going away"),
]


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_a_stream_cut_anywhere_gives_the_same_messages(cuts: list[int]) -> None:
    recorder = Recorder()
    points = [0, *sorted(cuts), len(STREAM)]
    for start, end in itertools.pairwise(points):
        recorder.decoder.feed(STREAM[start:end])
    assert recorder.events == EXPECTED


@pytest.mark.timeout(30)
def test_every_byte_on_its_own_gives_the_same_messages() -> None:
    recorder = Recorder()
    for index in range(len(STREAM)):
        recorder.decoder.feed(STREAM[index : index + 1])
    assert recorder.events == EXPECTED


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x81\x85" + b"mask" + b"hello", "masked"),
        (server_frame(TEXT, b"x", rsv=4), "reserved bit"),
        (server_frame(0x3, b"x"), "unknown opcode"),
        (server_frame(PING, b"x" * 126), "oversized control"),
        (server_frame(PONG, b"x", final=False), "fragmented"),
        (server_frame(CONTINUATION, b"x"), "without a message"),
        (server_frame(TEXT, b"a", final=False) + server_frame(TEXT, b"b"), "new message"),
        (struct.pack("!BBQ", 0x81, 127, 1 << 63), "most significant bit"),
        (server_frame(TEXT, b"x" * (LIMIT + 1)), "over the limit"),
        (
            server_frame(TEXT, b"x" * LIMIT, final=False) + server_frame(CONTINUATION, b"x"),
            "the limit",
        ),
    ],
)
def test_malformed_frames_are_clear_protocol_errors(data: bytes, error: str) -> None:
    recorder = Recorder()
    with pytest.raises(ProtocolError, match=error):
        recorder.decoder.feed(data)


@pytest.mark.timeout(60)
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    recorder = Recorder(max_size=1000)
    with contextlib.suppress(ProtocolError):
        recorder.decoder.feed(data)
    for kind, opcode, _ in recorder.events:
        assert opcode in ((TEXT, BINARY) if kind == "message" else (CLOSE, PING, PONG))


@pytest.mark.timeout(30)
def test_client_frames_are_masked_as_the_rfc_shows() -> None:
    # RFC 6455 §5.7: a masked "Hello".
    frame = codec.encode_frame(TEXT, b"Hello", mask=bytes.fromhex("37fa213d"))
    assert frame == bytes.fromhex("818537fa213d7f9f4d5158")
    long = codec.encode_frame(BINARY, b"y" * 70_000, mask=b"\x01\x02\x03\x04")
    assert long[:2] == b"\x82\xff"
    assert struct.unpack("!Q", long[2:10])[0] == 70_000
    assert codec.apply_mask(long[14:], b"\x01\x02\x03\x04") == b"y" * 70_000


@pytest.mark.timeout(30)
def test_close_frames_carry_code_and_reason() -> None:
    frame = codec.encode_close(1000, "bye")
    payload = codec.apply_mask(frame[6:], frame[2:6])
    assert codec.parse_close(payload) == (1000, "bye")
    assert codec.parse_close(b"") == (None, "")


KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3
ANSWER = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


@pytest.mark.timeout(30)
def test_the_handshake_answer_is_checked_and_what_follows_it_kept() -> None:
    assert codec.accept_for(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    request = codec.handshake_request("ha.local:8123", "/api/websocket", KEY, "test")
    assert request.startswith(b"GET /api/websocket HTTP/1.1\r\nHost: ha.local:8123\r\n")
    assert b"Sec-WebSocket-Key: " + KEY.encode() in request
    assert request.endswith(b"\r\n\r\n")
    first_frame = server_frame(TEXT, b"hi")
    data = ANSWER + first_frame
    for cut in range(len(data)):
        reader = HandshakeReader(KEY)
        rest = reader.feed(data[:cut])
        # After the answer the reader is done: later bytes go to the frame decoder.
        rest = reader.feed(data[cut:]) if rest is None else rest + data[cut:]
        assert rest == first_frame


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "HTTP 404 Not Found"),
        (ANSWER.replace(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"wrong"), "does not match"),
        (ANSWER.replace(b"Upgrade: websocket\r\n", b""), "does not upgrade"),
        (ANSWER[:-2] + b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n", "not offered"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP answer"),
        (b"x" * 70_000, "no end of headers"),
    ],
)
def test_a_wrong_handshake_answer_is_a_clear_error(answer: bytes, error: str) -> None:
    with pytest.raises(HandshakeError, match=error):
        HandshakeReader(KEY).feed(answer)
