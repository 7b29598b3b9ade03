"""An HTTP proxy in front of a real InfluxDB that fails the first N writes with a chosen status,
and can make every write it forwards slow (``delay`` seconds)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.servers import HOST


class FaultyProxy:
    def __init__(
        self,
        target: str,
        fail_first: int = 0,
        status: int = 500,
        retry_after: str | None = None,
        delay: float = 0.0,
    ):
        self.target = target
        self.delay = delay
        self.fail_first = fail_first
        self.status = status
        self.retry_after = retry_after
        self.failed = 0
        self.forwarded = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FaultyProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        sockets: Any = getattr(site._server, "sockets", None)
        self.url = f"http://{HOST}:{sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/write") and self.failed < self.fail_first:
            self.failed += 1
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.json_response(
                {"error": f"injected {self.status}"}, status=self.status, headers=headers
            )
        assert self._session is not None
        if request.path.endswith("/write") and self.delay:
            await asyncio.sleep(self.delay)
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with self._session.request(
            request.method,
            self.target + request.rel_url.path_qs,
            data=await request.read(),
            headers=headers,
        ) as upstream:
            body = await upstream.read()
            self.forwarded += 1
            passthrough = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower()
                in ("content-type", "content-encoding", "x-influxdb-version", "x-influxdb-build")
            }
            return web.Response(body=body, status=upstream.status, headers=passthrough)
