"""One client WebSocket connection over asyncio, with reads coalesced at a trickle.

``await connect()`` makes the TCP (and TLS) connection and the opening handshake; from then on
every text message is handed to ``on_message`` as it is read, synchronously and in order, until
``wait_closed()`` returns. Pings are answered here, a close from the server is answered and
ends the connection. Reconnecting is the caller's business: an object lives for one connection.

Why not a library's client: at a home's event rates each message arrives in its own TCP
segment, and a client that reads each at once wakes the event loop for each — most of what
receiving costs. Pausing the transport's reading for a moment (:mod:`~.read_gate`) needs the
transport, which the libraries do not expose.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from ha_ingestor import __version__
from ha_ingestor.sources.read_gate import ReadGate
from ha_ingestor.sources.stream import open_stream
from ha_ingestor.sources.websocket import codec
from ha_ingestor.sources.websocket.codec import WebSocketError

_DEFAULT_PORTS = {"ws": 80, "wss": 443}
#: A message larger than this ends the connection (a whole home's states is a few MB).
MAX_MESSAGE_SIZE = 256 * 1024 * 1024


class WebSocketConnection:
    def __init__(
        self,
        url: str,
        on_message: Callable[[bytes], None],
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        read_coalescing: float = 0.0,
        may_coalesce: Callable[[], bool] = lambda: True,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        """``url``: ``ws://`` or ``wss://`` (with ``ssl_context``, or the system's roots).
        ``read_coalescing``: at a trickle, read at most this often (seconds, 0 = at once),
        unless ``may_coalesce()`` says an answer is awaited. Binary messages are dropped."""
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        self._host = parts.hostname
        self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self._resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if parts.scheme == "wss":
            self._ssl: ssl.SSLContext | None = ssl_context or ssl.create_default_context()
        else:
            self._ssl = None
        self._on_message = on_message
        self._timeout = timeout
        self._may_coalesce = may_coalesce
        self._key = codec.new_key()
        self._handshake: codec.HandshakeReader | None = codec.HandshakeReader(self._key)
        self._decoder = codec.Decoder(self._message, self._control, max_message_size)
        loop = asyncio.get_running_loop()
        self._gate = ReadGate(loop, read_coalescing)
        self._transport: asyncio.Transport | None = None
        self._opened: asyncio.Future[None] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()
        self._error: Exception | None = None
        self._close_sent = False

    # --- lifecycle -------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Raises ``OSError`` (refused, TLS), :class:`~.codec.HandshakeError` or ``TimeoutError``."""
        try:
            async with asyncio.timeout(self._timeout):
                await open_stream(
                    self._host,
                    self._port,
                    self._ssl,
                    made=self._made,
                    received=self._received,
                    lost=self._lost,
                )
                self._write(
                    codec.handshake_request(
                        self._host_header(), self._resource, self._key, f"ha-ingestor/{__version__}"
                    )
                )
                await asyncio.shield(self._opened)
        except BaseException:
            self.abort()
            raise

    async def close(self) -> None:
        """The closing handshake (code 1000), waited for at most two seconds."""
        transport = self._transport
        if transport is not None and not transport.is_closing() and not self._close_sent:
            self._close_sent = True
            transport.write(codec.encode_close(1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._closed), 2.0)
        self.abort()

    def abort(self) -> None:
        self._close_sent = True
        if self._transport is not None:
            self._transport.abort()
        self._finish()

    async def wait_closed(self) -> Exception | None:
        """Until the connection ends; why it ended, None for a close of ours."""
        await asyncio.shield(self._closed)
        return self._error

    @property
    def closed(self) -> bool:
        return self._closed.done()

    def send_text(self, data: bytes) -> None:
        """One text message (``data`` is UTF-8). What comes in next is read at once."""
        self._write(codec.encode_frame(codec.TEXT, data))
        self._gate.read_now()

    # --- internals -------------------------------------------------------------------------------
    def _host_header(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        default = _DEFAULT_PORTS["wss" if self._ssl else "ws"]
        return host if self._port == default else f"{host}:{self._port}"

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self._close_sent:
            raise self._error or WebSocketError("not connected")
        transport.write(data)

    def _made(self, transport: asyncio.Transport) -> None:
        self._transport = self._gate.transport = transport

    def _received(self, data: bytes) -> None:
        try:
            if self._handshake is not None:
                rest = self._handshake.feed(data)
                if rest is None:
                    return
                self._handshake = None
                self._opened.set_result(None)
                data = rest
            self._decoder.feed(data)
        except Exception as exc:  # a protocol error, or the message handler's own
            self._fail(exc)
            return
        self._gate.after_read(len(data), time.monotonic(), may_pause=self._may_coalesce())

    def _message(self, opcode: int, payload: bytes) -> None:
        if opcode == codec.TEXT:
            self._on_message(payload)

    def _control(self, opcode: int, payload: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if opcode == codec.PING and not self._close_sent:
            transport.write(codec.encode_frame(codec.PONG, payload))
        elif opcode == codec.CLOSE:
            code, reason = codec.parse_close(payload)
            if not self._close_sent:  # the server's close: answer it, and say why it ended
                self._close_sent = True
                transport.write(codec.encode_close(code or 1000))
                text = f"the server closed the WebSocket (code {code})" if code else ""
                self._error = WebSocketError(
                    f"{text}: {reason}" if reason else text or "the server closed the WebSocket"
                )
            transport.close()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        if self._transport is not None:
            self._transport.abort()
        if not self._opened.done():
            self._opened.set_exception(error)

    def _lost(self, exc: Exception | None) -> None:
        if self._error is None and (exc is not None or not self._close_sent):
            self._error = WebSocketError(str(exc) if exc else "the server closed the connection")
        self._finish()

    def _finish(self) -> None:
        self._gate.close()
        if not self._opened.done():
            self._opened.set_exception(self._error or WebSocketError("closed"))
            self._opened.exception()  # retrieved: nobody may be waiting any more
        if not self._closed.done():
            self._closed.set_result(None)
