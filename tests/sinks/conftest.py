"""Helpers for the sink tests: a recording, fault-injecting proxy in front of a real InfluxDB,
an InfluxDB 1.x with authentication, a logger that records, and a writer harness."""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from ha_ingestor.config import Settings, load_settings
from ha_ingestor.pipeline.buffer import MemoryBuffer
from ha_ingestor.sinks.influxdb import InfluxClient
from ha_ingestor.sinks.writer import InfluxWriter
from ha_ingestor.telemetry import Telemetry
from tests.support.servers import HOST, InfluxDB1, started
from tests.support.waiting import wait_for

# --- a proxy that records every request and answers scripted faults ---------------------------


@dataclass
class Seen:
    """One request as the proxy saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw: bytes  # as sent (possibly gzip)
    lines: list[str]  # decompressed body, split into lines
    status: int = 0  # what the client got
    forwarded: bool = False
    started: float = 0.0
    answered: float = 0.0


Fault = tuple[int, dict[str, str], str]  # status, headers, body
Rule = Callable[["Seen"], Fault | None]


@dataclass
class Proxy:
    """Forwards to ``target`` unless ``rule`` returns a fault for a write request."""

    target: str
    rule: Rule = lambda seen: None
    delay: float = 0.0  # seconds added before forwarding a write
    requests: list[Seen] = field(default_factory=list)
    url: str = ""
    in_flight: int = 0
    max_in_flight: int = 0

    def writes(self) -> list[Seen]:
        return [r for r in self.requests if r.path.endswith(("/write", "/write_lp"))]

    def stored_lines(self) -> list[str]:
        """Lines of every write that reached InfluxDB and was acknowledged by it."""
        return [line for r in self.writes() if r.forwarded and r.status < 300 for line in r.lines]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = gzip.decompress(raw) if request.headers.get("Content-Encoding") == "gzip" else raw
        seen = Seen(
            request.method,
            request.path,
            dict(request.query),
            dict(request.headers),
            raw,
            body.decode().split("\n") if body else [],
            started=time.monotonic(),
        )
        self.requests.append(seen)
        is_write = request.path.endswith(("/write", "/write_lp"))
        self.in_flight += is_write
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fault = self.rule(seen) if is_write else None
            if is_write and self.delay:
                await asyncio.sleep(self.delay)
            if fault is not None:
                status, headers, text = fault
                seen.status, seen.answered = status, time.monotonic()
                return web.Response(status=status, headers=headers, text=text)
            return await self._forward(request, seen)
        finally:
            self.in_flight -= is_write

    async def _forward(self, request: web.Request, seen: Seen) -> web.Response:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method,
                self.target + request.rel_url.path_qs,
                data=seen.raw,
                headers=headers,
            ) as upstream,
        ):
            body = await upstream.read()
            seen.status, seen.forwarded, seen.answered = upstream.status, True, time.monotonic()
            keep = ("content-type", "content-encoding", "x-influxdb-version", "x-influxdb-build")
            passthrough = {k: v for k, v in upstream.headers.items() if k.lower() in keep}
            return web.Response(body=body, status=upstream.status, headers=passthrough)


@asynccontextmanager
async def serving(handler: Callable[[web.Request], Any]) -> AsyncIterator[str]:
    """An aiohttp server on a free loopback port that leaves request bodies compressed."""
    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    sockets: Any = getattr(site._server, "sockets", None)
    try:
        yield f"http://{HOST}:{sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def proxy(influxdb: InfluxDB1) -> AsyncIterator[Proxy]:
    state = Proxy(influxdb.url)
    async with serving(state.handle) as url:
        state.url = url
        yield state


# --- an InfluxDB 1.x with authentication -----------------------------------------------------


class AuthInfluxDB1(InfluxDB1):
    """InfluxDB 1.x with ``auth-enabled``; ``admin``/``admin-pw`` holds all privileges."""

    admin = ("admin", "admin-pw")

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        config = self.config_path.read_text()
        self.config_path.write_text(
            config.replace("  log-enabled = false", "  log-enabled = false\n  auth-enabled = true")
        )

    def start(self, timeout: float = 30.0) -> None:
        super().start(timeout)
        self.statement(
            f"CREATE USER {self.admin[0]} WITH PASSWORD '{self.admin[1]}' WITH ALL PRIVILEGES"
        )

    def statement(self, statement: str, database: str | None = None) -> dict[str, Any]:
        """Run InfluxQL as the admin; returns the first result."""
        import json

        params = {"q": statement, "epoch": "ns", **({"db": database} if database else {})}
        request = urllib.request.Request(
            f"{self.url}/query", data=urllib.parse.urlencode(params).encode()
        )
        credentials = base64.b64encode(":".join(self.admin).encode()).decode()
        request.add_header("Authorization", f"Basic {credentials}")
        with urllib.request.urlopen(request, timeout=30) as response:
            result: dict[str, Any] = json.loads(response.read())["results"][0]
        if "error" in result:
            raise RuntimeError(f"InfluxQL error: {result['error']} ({statement})")
        return result

    def count(self, database: str, measurement: str, field: str = "*") -> int:
        series = self.statement(f'SELECT count({field}) FROM "{measurement}"', database)
        values = series.get("series", [{}])[0].get("values", [[0, 0]])[0]
        return max(int(v) for v in values[1:] if v)


@pytest.fixture(scope="session")
def influxdb_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthInfluxDB1]:
    with started(AuthInfluxDB1(tmp_path_factory.mktemp("influxdb-auth"))) as server:
        yield server


# --- telemetry that records what was logged --------------------------------------------------


@dataclass
class RecordingLogger:
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def _record(self, level: str, event: str, **data: Any) -> None:
        self.events.append((level, event, data))

    def debug(self, event: str, **data: Any) -> None:
        self._record("debug", event, **data)

    def info(self, event: str, **data: Any) -> None:
        self._record("info", event, **data)

    def warning(self, event: str, **data: Any) -> None:
        self._record("warning", event, **data)

    def error(self, event: str, **data: Any) -> None:
        self._record("error", event, **data)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [data for _, name, data in self.events if name == event]

    def states(self, target: str = "influxdb") -> list[str]:
        """Connection states of ``target`` in the order they were entered (from the logs)."""
        states = []
        for _, name, data in self.events:
            if data.get("target") != target:
                continue
            if name == "connection up":
                states.append("connected")
            elif name == "connection failed":
                states.append("failed")
            elif name == "connection down":
                states.append(str(data["state"]))
            elif name == "connection stopped":
                states.append("stopped")
        return states


def new_telemetry() -> tuple[Telemetry, RecordingLogger]:
    logger = RecordingLogger()
    return Telemetry(CollectorRegistry(), logger=logger), logger


def sample(telemetry: Telemetry, name: str, **labels: str) -> float:
    """A metric's current value (0 when never set)."""
    value = telemetry.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def make_settings(url: str, tmp_path: Path, **env: str) -> Settings:
    return load_settings(
        {
            "HA_INGESTOR_MQTT_HOST": "broker",
            "HA_INGESTOR_INFLUX_URL": url,
            "HA_INGESTOR_SPOOL_DIR": str(tmp_path / "spool"),
            "HA_INGESTOR_INFLUX_FLUSH_INTERVAL": "0.05",
            **{f"HA_INGESTOR_{k.upper()}": v for k, v in env.items()},
        }
    )


# --- a running writer ------------------------------------------------------------------------


@dataclass
class Harness:
    writer: InfluxWriter
    buffer: MemoryBuffer
    telemetry: Telemetry
    log: RecordingLogger
    task: asyncio.Task[None]

    def add(self, lines: list[str]) -> asyncio.Future[list[None]]:
        """Add lines in one burst (one group, so one batch when it fits)."""
        return asyncio.gather(*(self.buffer.add(line) for line in lines))

    async def drained(self, timeout: float = 60.0) -> None:
        await wait_for(lambda: self.buffer.depth()[0] == 0, timeout, message="buffer drained")

    def metric(self, name: str, **labels: str) -> float:
        return sample(self.telemetry, name, **labels)


@asynccontextmanager
async def running_writer(
    settings: Settings,
    buffer: MemoryBuffer | None = None,
    *,
    retry_base: float = 0.01,
    retry_cap: float = 0.05,
    auth_log_interval: float = 60.0,
) -> AsyncIterator[Harness]:
    """A writer with fast retries over a fresh buffer and telemetry; stopped on exit."""
    telemetry, log = new_telemetry()
    buffer = buffer if buffer is not None else MemoryBuffer()
    async with aiohttp.ClientSession() as session:
        writer = InfluxWriter(
            settings,
            InfluxClient(settings, session),
            buffer,
            telemetry,
            retry_base=retry_base,
            retry_cap=retry_cap,
            auth_log_interval=auth_log_interval,
        )
        task = asyncio.create_task(writer.run(), name="writer-under-test")
        harness = Harness(writer, buffer, telemetry, log, task)
        try:
            yield harness
        finally:
            await writer.stop(1.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
