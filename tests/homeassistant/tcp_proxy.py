"""A TCP proxy that can silently swallow the traffic of its open connections: a network
path that goes dead without a FIN or RST, which only an application ping detects."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from tests.support.servers import HOST


class _Pipe:
    def __init__(self) -> None:
        self.dead = False
        self.tasks: list[asyncio.Task[None]] = []


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self.port = 0
        self.connections = 0

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        sockets: Any = self._server.sockets
        self.port = int(sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            for task in pipe.tasks:
                task.cancel()
            await asyncio.gather(*pipe.tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def go_dead(self) -> None:
        """From now on, the connections open right now carry nothing, either way, and stay
        open. New connections work normally."""
        for pipe in self._pipes:
            pipe.dead = True

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            client_writer.close()
            return
        pipe = _Pipe()
        self._pipes.add(pipe)
        pipe.tasks = [
            asyncio.create_task(self._copy(pipe, client_reader, upstream_writer)),
            asyncio.create_task(self._copy(pipe, upstream_reader, client_writer)),
        ]
        await asyncio.gather(*pipe.tasks, return_exceptions=True)
        self._pipes.discard(pipe)

    @staticmethod
    async def _copy(
        pipe: _Pipe, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                if not pipe.dead:
                    writer.write(data)
                    await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
