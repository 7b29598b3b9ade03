"""HTTP contract of the InfluxDB write APIs (v1, v2, v3) against a recording stub server.

InfluxDB 2.x and 3.x cannot be installed here; these tests pin down what HA Ingestor sends
(paths, query parameters, authentication, compression) and how it reads the answers.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from ha_ingestor.config import InfluxApi, load_settings
from ha_ingestor.pipeline.buffer import MemoryBuffer
from ha_ingestor.sinks.influxdb import InfluxClient, Outcome, classify
from ha_ingestor.sinks.writer import InfluxWriter
from ha_ingestor.telemetry import Telemetry


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Stub:
    """Answers scripted statuses for writes (then 204) and records every request."""

    ping_headers: dict[str, str] = field(default_factory=dict)
    ping_status: int = 204
    write_answers: list[tuple[int, dict[str, str], str]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if body[:2] == b"\x1f\x8b":  # aiohttp may already have inflated it
            body = gzip.decompress(body)
        self.requests.append(
            Recorded(request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        if request.path == "/ping":
            return web.Response(status=self.ping_status, headers=self.ping_headers)
        if request.path == "/query":
            return web.json_response({"results": [{"statement_id": 0}]})
        if self.write_answers:
            status, headers, text = self.write_answers.pop(0)
            return web.Response(status=status, headers=headers, text=text)
        return web.Response(status=204)

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.path not in ("/ping", "/query")]


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    state = Stub()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sockets: Any = getattr(site._server, "sockets", None)
    state.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    yield state
    await runner.cleanup()


def settings_for(stub: Stub, **env: str) -> Any:
    return load_settings(
        {
            "HA_INGESTOR_MQTT_HOST": "broker",
            "HA_INGESTOR_INFLUX_URL": stub.url,
            **{f"HA_INGESTOR_{k.upper()}": v for k, v in env.items()},
        }
    )


async def write_once(stub: Stub, body: bytes = b"m v=1 1", **env: str) -> tuple[InfluxClient, Any]:
    async with aiohttp.ClientSession() as session:
        client = InfluxClient(settings_for(stub, **env), session)
        await client.prepare()
        return client, await client.write(body)


async def test_v2_write_uses_token_org_bucket_and_ns_precision(stub: Stub) -> None:
    _, result = await write_once(
        stub,
        influx_api="v2",
        influx_token="t0ken",
        influx_org="home",
        influx_bucket="ha",
        influx_gzip="true",
    )
    assert result.outcome is Outcome.OK
    (write,) = stub.writes()
    assert write.path == "/api/v2/write"
    assert write.query == {"org": "home", "bucket": "ha", "precision": "ns"}
    assert write.headers["Authorization"] == "Token t0ken"
    assert write.headers["Content-Encoding"] == "gzip"
    assert write.body == b"m v=1 1"


async def test_v3_write_uses_bearer_token_and_write_lp(stub: Stub) -> None:
    _, result = await write_once(
        stub, influx_api="v3", influx_token="t0ken", influx_database="home"
    )
    assert result.outcome is Outcome.OK
    (write,) = stub.writes()
    assert write.path == "/api/v3/write_lp"
    assert write.query == {"db": "home", "precision": "nanosecond"}
    assert write.headers["Authorization"] == "Bearer t0ken"


async def test_v1_write_uses_basic_auth_db_and_rp_and_creates_the_database(stub: Stub) -> None:
    _, result = await write_once(
        stub,
        influx_api="v1",
        influx_username="u",
        influx_password="p w",
        influx_database='we"ird',
        influx_retention_policy="autogen",
    )
    assert result.outcome is Outcome.OK
    create = next(r for r in stub.requests if r.path == "/query")
    assert b"CREATE+DATABASE" in create.body or b"CREATE DATABASE" in create.body
    (write,) = stub.writes()
    assert write.path == "/write"
    assert write.query == {"db": 'we"ird', "precision": "ns", "rp": "autogen"}
    assert write.headers["Authorization"] == "Basic dTpwIHc="
    assert "p w" not in str(write.query)


@pytest.mark.parametrize(
    ("headers", "status", "env", "expected"),
    [
        ({"X-Influxdb-Version": "1.8.10"}, 204, {}, InfluxApi.V1),
        ({"X-Influxdb-Version": "v2.7.4"}, 204, {}, InfluxApi.V2),
        ({"X-Influxdb-Version": "3.0.1"}, 204, {}, InfluxApi.V3),
        ({}, 401, {}, InfluxApi.V3),
        ({}, 204, {"influx_bucket": "b"}, InfluxApi.V2),
    ],
)
async def test_auto_detection_from_ping(
    stub: Stub, headers: dict[str, str], status: int, env: dict[str, str], expected: InfluxApi
) -> None:
    stub.ping_headers, stub.ping_status = headers, status
    async with aiohttp.ClientSession() as session:
        assert await InfluxClient(settings_for(stub, **env), session).detect() == expected


@pytest.mark.parametrize(
    ("status", "body", "headers", "outcome"),
    [
        (204, "", {}, Outcome.OK),
        (400, '{"error":"partial write: field type conflict"}', {}, Outcome.REJECTED),
        (422, '{"code":"invalid","message":"unprocessable"}', {}, Outcome.REJECTED),
        (401, '{"error":"unauthorized"}', {}, Outcome.AUTH),
        (403, "", {}, Outcome.AUTH),
        (404, '{"error":"database not found: \\"x\\""}', {}, Outcome.NOT_FOUND),
        (413, "", {}, Outcome.TOO_LARGE),
        (429, "", {"Retry-After": "7"}, Outcome.RETRY),
        (500, "boom", {}, Outcome.RETRY),
        (503, "", {"Retry-After": "2"}, Outcome.RETRY),
    ],
)
def test_answers_are_classified(
    status: int, body: str, headers: dict[str, str], outcome: Outcome
) -> None:
    result = classify(status, body, headers)
    assert result.outcome is outcome
    if "Retry-After" in headers:
        assert result.retry_after == float(headers["Retry-After"])
    if status == 400:
        assert result.message == "partial write: field type conflict"


async def test_connection_refused_is_retryable(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "HA_INGESTOR_MQTT_HOST": "b",
            "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:9",
            "HA_INGESTOR_INFLUX_API": "v1",
        }
    )
    async with aiohttp.ClientSession() as session:
        result = await InfluxClient(settings, session).write(b"m v=1 1")
    assert result.outcome is Outcome.RETRY


async def run_writer(stub: Stub, tmp_path: Path, lines: list[str], **env: str) -> Telemetry:
    settings = settings_for(
        stub,
        influx_api="v2",
        influx_token="t",
        influx_org="o",
        influx_bucket="b",
        spool_dir=str(tmp_path),
        influx_flush_interval="0.05",
        **env,
    )
    telemetry = Telemetry(CollectorRegistry())
    buffer = MemoryBuffer()
    async with aiohttp.ClientSession() as session:
        writer = InfluxWriter(settings, InfluxClient(settings, session), buffer, telemetry)
        task = asyncio.create_task(writer.run())
        await asyncio.gather(*(buffer.add(line) for line in lines))
        for _ in range(400):
            if buffer.depth()[0] == 0:
                break
            await asyncio.sleep(0.05)
        await writer.stop(1)
        task.cancel()
    return telemetry


async def test_413_splits_the_batch_and_retry_after_is_honoured(stub: Stub, tmp_path: Path) -> None:
    stub.write_answers = [(413, {}, "too large"), (503, {"Retry-After": "1"}, "")]
    lines = [f"m v={i} {i}" for i in range(10)]
    started = asyncio.get_running_loop().time()
    telemetry = await run_writer(stub, tmp_path, lines)
    assert asyncio.get_running_loop().time() - started >= 1.0, "waited for Retry-After"
    written = [line for w in stub.writes() for line in w.body.decode().split("\n")]
    assert sorted(set(written)) == sorted(lines)
    assert len(stub.writes()) >= 3
    registry = telemetry.metrics.registry
    assert registry.get_sample_value("ha_ingestor_write_errors_total", {"kind": "too_large"}) == 1
    assert (
        registry.get_sample_value("ha_ingestor_points_written_total", {"measurement": "other"})
        == 10
    )
