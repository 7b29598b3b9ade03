"""A TCP connection (TLS when given a context) whose events go to three callbacks: the asyncio
plumbing the MQTT and WebSocket connections share. They keep the transport, to write to it and
to pause its reading (:mod:`~.read_gate`)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable


class _Forwarder(asyncio.Protocol):
    def __init__(
        self,
        made: Callable[[asyncio.Transport], None],
        received: Callable[[bytes], None],
        lost: Callable[[Exception | None], None],
    ) -> None:
        self._made = made
        self._received = received
        self._lost = lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._made(transport)

    def data_received(self, data: bytes) -> None:
        self._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)


async def open_stream(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    made: Callable[[asyncio.Transport], None],
    received: Callable[[bytes], None],
    lost: Callable[[Exception | None], None],
) -> None:
    """Connect; ``made(transport)`` runs before this returns, then ``received(data)`` for each
    read and ``lost(error or None)`` once at the end. Raises ``OSError`` (refused, TLS)."""
    await asyncio.get_running_loop().create_connection(
        lambda: _Forwarder(made, received, lost),
        host,
        port,
        ssl=ssl_context,
        server_hostname=host if ssl_context else None,
    )
