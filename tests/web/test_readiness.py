"""Readiness as a pure function of settings, connection states and buffer depth."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ha_ingestor.pipeline.buffer import MEMORY_ONLY, MemoryBuffer, StorageStatus
from ha_ingestor.telemetry import ConnState, Telemetry
from ha_ingestor.web.readiness import Readiness, enabled_sources, not_ready
from tests.web.support import BOTH_SOURCES, MQTT_ONLY, make_settings

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()
MIB = 1024 * 1024


def telemetry_at(t: float = T0) -> Telemetry:
    return Telemetry(clock=lambda: t)


def test_enabled_sources_follow_the_settings() -> None:
    assert enabled_sources(make_settings()) == ["mqtt"]
    assert enabled_sources(make_settings(BOTH_SOURCES)) == ["mqtt", "homeassistant"]
    ha_only = {k: v for k, v in BOTH_SOURCES.items() if k != "HA_INGESTOR_MQTT_HOST"}
    assert enabled_sources(make_settings(ha_only)) == ["homeassistant"]


def test_sources_that_have_not_started_are_not_ready() -> None:
    problems = not_ready(make_settings(BOTH_SOURCES), {}, (0, 0))
    assert problems == {"mqtt": "not started", "homeassistant": "not started"}


def test_every_enabled_source_must_be_connected() -> None:
    settings = make_settings(BOTH_SOURCES)
    telemetry = telemetry_at()
    telemetry.set_state("mqtt", ConnState.CONNECTED)
    telemetry.set_state("homeassistant", ConnState.RECONNECTING, error="connection refused")
    telemetry.set_state("influxdb", ConnState.CONNECTED)
    assert not_ready(settings, telemetry.connections, (0, 0)) == {
        "homeassistant": "reconnecting since 2026-03-01T12:00:00+00:00: connection refused"
    }
    telemetry.set_state("homeassistant", ConnState.CONNECTED)
    assert not_ready(settings, telemetry.connections, (0, 0)) == {}


def test_a_disabled_source_does_not_count() -> None:
    telemetry = telemetry_at()
    telemetry.set_state("mqtt", ConnState.CONNECTED)
    telemetry.set_state("homeassistant", ConnState.FAILED, error="auth_invalid")
    assert not_ready(make_settings(MQTT_ONLY), telemetry.connections, (0, 0)) == {}


def test_a_failed_sink_is_not_ready_even_while_spooling() -> None:
    telemetry = telemetry_at()
    telemetry.set_state("mqtt", ConnState.CONNECTED)
    telemetry.set_state("influxdb", ConnState.FAILED, error="HTTP 401: unauthorized")
    problems = not_ready(make_settings(), telemetry.connections, (10, 1000))
    assert problems == {
        "influxdb": "failed since 2026-03-01T12:00:00+00:00: HTTP 401: unauthorized"
    }


@pytest.mark.parametrize("sink", [None, ConnState.CONNECTING, ConnState.RECONNECTING])
def test_a_sink_that_is_down_is_fine_while_the_spool_has_room(sink: ConnState | None) -> None:
    settings = make_settings(spool_max_bytes=str(100 * MIB))
    telemetry = telemetry_at()
    telemetry.set_state("mqtt", ConnState.CONNECTED)
    if sink is not None:
        telemetry.set_state("influxdb", sink, error="connection refused")
    assert not_ready(settings, telemetry.connections, (1000, 94 * MIB)) == {}
    problems = not_ready(settings, telemetry.connections, (1000, 96 * MIB))
    assert list(problems) == ["influxdb"]
    assert problems["influxdb"].endswith("spool 96% full")


def test_without_the_spool_a_sink_that_is_down_is_not_ready() -> None:
    settings = make_settings(spool_enabled="false")
    telemetry = telemetry_at()
    telemetry.set_state("mqtt", ConnState.CONNECTED)
    telemetry.set_state("influxdb", ConnState.RECONNECTING, error="HTTP 503: unavailable")
    problems = not_ready(settings, telemetry.connections, (0, 0))
    assert problems == {
        "influxdb": "reconnecting since 2026-03-01T12:00:00+00:00: HTTP 503: unavailable; "
        "spool disabled, nothing is kept safe"
    }
    telemetry.set_state("influxdb", ConnState.CONNECTED)
    assert not_ready(settings, telemetry.connections, (0, 0)) == {}


def test_a_full_spool_does_not_matter_while_influxdb_is_connected() -> None:
    telemetry = telemetry_at()
    telemetry.set_state("mqtt", ConnState.CONNECTED)
    telemetry.set_state("influxdb", ConnState.CONNECTED)
    assert not_ready(make_settings(spool_max_bytes=str(MIB)), telemetry.connections, (1, MIB)) == {}


def test_readiness_reads_the_live_state() -> None:
    telemetry = telemetry_at()
    readiness = Readiness(make_settings(), telemetry, MemoryBuffer())
    assert not readiness.is_ready()
    assert readiness.problems() == {"mqtt": "not started"}
    telemetry.set_state("mqtt", ConnState.CONNECTED)
    assert readiness.is_ready()
    telemetry.set_state("mqtt", ConnState.STOPPED)
    assert readiness.problems() == {"mqtt": "stopped since 2026-03-01T12:00:00+00:00"}


def test_a_spool_that_cannot_store_is_not_ready_and_says_why_and_what_to_do() -> None:
    settings = make_settings(spool_dir="/data/spool")
    telemetry = telemetry_at()
    telemetry.set_state("mqtt", ConnState.CONNECTED)
    telemetry.set_state("influxdb", ConnState.CONNECTED)
    fault = StorageStatus(
        durable=False,
        state="disk_full",
        error="database or disk is full",
        since=T0,
        advice="free space on the spool's disk",
    )
    problems = not_ready(settings, telemetry.connections, (1234, 5 * MIB), fault)
    assert problems == {
        "spool": "disk_full since 2026-03-01T12:00:00+00:00: database or disk is full "
        "(/data/spool); new data is not accepted (MQTT messages are not acknowledged); "
        "1234 lines wait to be written to InfluxDB; free space on the spool's disk"
    }
    ok = StorageStatus(durable=True, state="ok")
    assert not_ready(settings, telemetry.connections, (1234, 5 * MIB), ok) == {}
    assert not_ready(settings, telemetry.connections, (0, 0), MEMORY_ONLY) == {}
