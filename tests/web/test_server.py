"""The HTTP endpoints, served by a real server on a free port and read with a real client."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ha_ingestor import __version__
from ha_ingestor.pipeline.buffer import MemoryBuffer
from ha_ingestor.pipeline.spool import SqliteSpool
from ha_ingestor.telemetry import ConnState, Telemetry
from ha_ingestor.web.readiness import Readiness
from ha_ingestor.web.server import HttpServer, RateHistory
from tests.support.waiting import wait_for
from tests.web.support import BOTH_SOURCES, make_settings, serve

pytestmark = pytest.mark.timeout(30)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_port_zero_binds_a_free_port_and_exit_stops_serving() -> None:
    async with serve() as served:
        port = served.server.port
        assert port > 0
        assert (await served.get("/healthz"))[0] == 200
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=2),
    ):
        pass


async def test_a_port_in_use_fails_on_enter() -> None:
    telemetry, buffer = Telemetry(), MemoryBuffer()
    readiness = Readiness(make_settings(), telemetry, buffer)
    async with serve(telemetry=telemetry, buffer=buffer) as served:
        second = HttpServer("127.0.0.1", served.server.port, telemetry, buffer, readiness)
        with pytest.raises(OSError, match="in use"):
            async with second:
                pass
        assert (await served.get("/healthz"))[0] == 200


async def test_healthz() -> None:
    async with serve() as served:
        status, body = await served.get_json("/healthz")
        assert (status, body) == (200, {"status": "ok"})
        async with served.session.head(served.url + "/healthz") as response:
            assert response.status == 200


async def test_readyz_follows_connection_states() -> None:
    async with serve(make_settings(BOTH_SOURCES)) as served:
        telemetry = served.telemetry
        status, body = await served.get_json("/readyz")
        assert status == 503
        assert body == {
            "status": "not ready",
            "not_ready": {"mqtt": "not started", "homeassistant": "not started"},
        }
        telemetry.set_state("mqtt", ConnState.CONNECTED)
        telemetry.set_state("homeassistant", ConnState.CONNECTED)
        assert await served.get_json("/readyz") == (200, {"status": "ready"})

        telemetry.set_state("mqtt", ConnState.RECONNECTING, error="connection refused")
        status, body = await served.get_json("/readyz")
        assert status == 503
        assert list(body["not_ready"]) == ["mqtt"]
        assert body["not_ready"]["mqtt"].startswith("reconnecting since 20")
        assert body["not_ready"]["mqtt"].endswith(": connection refused")

        telemetry.set_state("mqtt", ConnState.CONNECTED)
        telemetry.set_state("influxdb", ConnState.FAILED, error="HTTP 401: unauthorized")
        status, body = await served.get_json("/readyz")
        assert status == 503
        assert list(body["not_ready"]) == ["influxdb"]
        telemetry.set_state("influxdb", ConnState.CONNECTED)
        assert (await served.get_json("/readyz"))[0] == 200


async def test_metrics_expose_what_was_counted() -> None:
    async with serve() as served:
        metrics = served.telemetry.metrics
        metrics.events_received.labels("mqtt").inc(1234)
        metrics.events_received.labels("homeassistant").inc(56)
        metrics.points_written.labels("mqtt_message").inc(1200)
        served.telemetry.dropped("excluded_topic", 7, intentional=True)
        metrics.write_errors.labels("retryable").inc(3)
        served.telemetry.set_state("mqtt", ConnState.CONNECTED)
        served.telemetry.set_state("influxdb", ConnState.RECONNECTING, error="refused")
        for _ in range(5):
            served.buffer.add("m v=1i 1")
        await served.buffer.flush()

        status, text, content_type = await served.get("/metrics")
        assert status == 200
        assert content_type == "text/plain"
        values = parse_metrics(text)
        assert values[("ha_ingestor_events_received_total", (("source", "mqtt"),))] == 1234
        assert values[("ha_ingestor_events_received_total", (("source", "homeassistant"),))] == 56
        assert (
            values[("ha_ingestor_points_written_total", (("measurement", "mqtt_message"),))] == 1200
        )
        dropped = (("intentional", "true"), ("reason", "excluded_topic"))
        assert values[("ha_ingestor_events_dropped_total", dropped)] == 7
        assert values[("ha_ingestor_write_errors_total", (("kind", "retryable"),))] == 3
        assert values[("ha_ingestor_connection_up", (("target", "mqtt"),))] == 1
        assert values[("ha_ingestor_connection_up", (("target", "influxdb"),))] == 0
        assert values[("ha_ingestor_queue_depth", (("queue", "buffer"),))] == 5
        assert values[("ha_ingestor_build_info", (("version", __version__),))] == 1


async def test_metrics_report_the_spool_depth_at_scrape_time(tmp_path: Path) -> None:
    telemetry = Telemetry()
    async with SqliteSpool(tmp_path / "spool", telemetry) as spool:
        await asyncio.gather(*(spool.add(f"m v={i}i {i}") for i in range(10)))
        lines, size = spool.depth()
        assert lines == 10
        settings = make_settings(spool_dir=str(tmp_path / "spool"))
        async with serve(settings, telemetry, spool) as served:
            values = parse_metrics((await served.get("/metrics"))[1])
            assert values[("ha_ingestor_spool_lines", ())] == 10
            assert values[("ha_ingestor_spool_bytes", ())] == size
            status = (await served.get_json("/status"))[1]
            buffer = status["buffer"]
            storage = buffer.pop("storage")
            assert buffer == {
                "lines": 10,
                "bytes": size,
                "durable": True,
                "max_bytes": settings.spool_max_bytes,
            }
            assert storage["state"] == "ok"
            assert storage["error"] is None
            assert storage["free_bytes"] > 0


async def test_status_reports_state_counters_rates_and_errors() -> None:
    settings = make_settings(BOTH_SOURCES, spool_enabled="false")
    async with serve(settings, sample_interval=0.05) as served:
        telemetry = served.telemetry
        metrics = telemetry.metrics
        telemetry.set_state("mqtt", ConnState.CONNECTED)
        telemetry.set_state("homeassistant", ConnState.CONNECTED)
        telemetry.set_state("homeassistant", ConnState.RECONNECTING, error="<b>closed</b>")
        telemetry.set_state("influxdb", ConnState.CONNECTED)
        telemetry.error("spool", "spool commit failed", error="disk full")
        metrics.events_received.labels("mqtt").inc(10)
        metrics.points_written.labels("ha_state").inc(4)
        metrics.points_written.labels("mqtt_message").inc(6)
        telemetry.dropped("excluded_topic", 2, intentional=True)
        telemetry.dropped("rejected_by_influxdb", 1, intentional=False)
        metrics.write_errors.labels("auth").inc()
        metrics.dead_lettered.inc(1)
        metrics.queue_depth.labels("homeassistant").set(3)
        served.buffer.add("m v=1i 1")
        await served.buffer.flush()

        async def received_more() -> bool:
            metrics.events_received.labels("mqtt").inc(100)
            metrics.points_written.labels("mqtt_message").inc(50)
            status = (await served.get_json("/status"))[1]
            return len(status["rates"]) >= 3

        await wait_for(received_more, timeout=10, interval=0.05)
        status_code, status = await served.get_json("/status")

    assert status_code == 200
    assert status["version"] == __version__
    assert status["uptime_seconds"] >= 0
    assert status["now"] >= status["started_at"]
    assert status["ready"] is False
    assert list(status["not_ready"]) == ["homeassistant"]
    connections = status["connections"]
    assert set(connections) == {"mqtt", "homeassistant", "influxdb"}
    ha = connections["homeassistant"]
    assert ha["state"] == "reconnecting"
    assert ha["reconnects"] == 1
    assert ha["last_error"] == "<b>closed</b>"
    assert set(ha) == {"state", "since", "reconnects", "last_error", "last_error_at"}
    assert connections["mqtt"]["state"] == "connected"
    assert status["buffer"].pop("storage")["state"] == "memory"
    assert status["buffer"] == {"lines": 1, "bytes": 9, "durable": False, "max_bytes": None}
    assert status["queues"] == {"homeassistant": 3}
    counters = status["counters"]
    assert counters["received"]["mqtt"] >= 110
    assert counters["written"]["ha_state"] == 4
    assert counters["written"]["mqtt_message"] >= 56
    assert counters["dropped"] == {"excluded_topic": 2, "rejected_by_influxdb": 1}
    assert counters["write_errors"] == {"auth": 1}
    assert counters["invalid"] == {}
    assert counters["dead_lettered"] == {"lines": 1}
    assert counters["backfilled"] == {"points": 0}
    rates = status["rates"]
    assert all(set(r) == {"time", "received", "written"} for r in rates)
    assert [r["time"] for r in rates] == sorted(r["time"] for r in rates)
    assert any(r["received"] > 0 for r in rates)
    assert any(r["written"] > 0 for r in rates)
    errors = status["recent_errors"]
    assert {"component": "homeassistant", "error": "<b>closed</b>"}.items() <= errors[0].items()
    assert errors[-1]["component"] == "spool"
    assert errors[-1]["error"] == "spool commit failed: disk full"


def test_rates_are_per_second_differences() -> None:
    history = RateHistory(window=10, interval=1)
    history.add(100.0, 1.0, 0, 0)
    history.add(102.0, 3.0, 200, 100)
    history.add(104.0, 5.0, 200, 300)
    assert history.rates() == [
        {"time": 102.0, "received": 100.0, "written": 50.0},
        {"time": 104.0, "received": 0.0, "written": 100.0},
    ]
    for i in range(20):
        history.add(200.0 + i, 10.0 + i, 0, 0)
    assert len(history.rates()) == 10  # a window of 10 s at one sample per second


async def test_status_page_is_self_contained_html() -> None:
    async with serve() as served:
        status, page, content_type = await served.get("/")
    assert status == 200
    assert content_type == "text/html"
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert "<svg" in page
    assert 'fetch("status"' in page
    for external in ("http://", "https://", "<link", " src=", "@import", "url("):
        assert external not in page, f"the page must not load {external}"


async def test_unknown_paths_are_404() -> None:
    async with serve() as served:
        assert (await served.get("/nope"))[0] == 404


async def test_client_keeps_working_across_many_requests() -> None:
    async with serve() as served:
        results = await asyncio.gather(*(served.get("/status") for _ in range(50)))
    assert {status for status, _, _ in results} == {200}


async def test_server_stops_promptly_with_an_idle_keep_alive_connection() -> None:
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        async with serve() as served:
            async with session.get(served.url + "/healthz") as response:
                assert response.status == 200
            started = loop.time()
        assert loop.time() - started < 1.5
