"""The WebSocket source against a real Home Assistant, stored in a real InfluxDB 1.x."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.e2e.service import RunningService, mqtt_rows, numbered, run_service, service_env
from tests.homeassistant.harness import (
    burst_of_state_changes,
    switch_and_script,
    wait_backfill_counted,
)
from tests.support.homeassistant import HomeAssistant
from tests.support.ingestor import ingestor_process
from tests.support.mqtt_publisher import publish_many
from tests.support.servers import InfluxDB1, Mosquitto, free_port
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.homeassistant, pytest.mark.timeout(300)]


def stored_states(service: RunningService, since: float, prefix: str = "") -> set[tuple[str, int]]:
    rows = service.influx.rows(
        f"SELECT state FROM ha_state WHERE time >= {int(since * 1e9)} GROUP BY entity_id",
        service.database,
    )
    return {
        (row["entity_id"], row["time"] // 1000)
        for row in rows
        if row["entity_id"].startswith(prefix)
    }


def stored_point_count(service: RunningService, since: float) -> int:
    series = service.influx.query(
        f"SELECT count(state) FROM ha_state WHERE time >= {int(since * 1e9)}", service.database
    )
    return int(series[0]["values"][0][1]) if series else 0


async def wait_for_coverage(
    service: RunningService,
    ha: HomeAssistant,
    since: float,
    expected: dict[str, int],
    timeout: float = 120,
    both_ways: bool = True,
) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """Wait until the recorder has the ``expected`` rows per entity-id prefix and InfluxDB and
    the recorder agree (the recorder writes in the background, so both are polled): both
    ways, or with ``both_ways=False`` only every row having its point. An entity's removal is
    a row too (state "")."""
    recorded: set[tuple[str, int]] = set()
    stored: set[tuple[str, int]] = set()

    def covered() -> bool:
        nonlocal recorded, stored
        recorded = ha.recorded_states(since)
        stored = stored_states(service, since)
        complete = all(
            sum(1 for entity, _ in recorded if entity.startswith(prefix)) >= count
            for prefix, count in expected.items()
        )
        return complete and (recorded == stored if both_ways else recorded <= stored)

    with contextlib.suppress(TimeoutError):
        await wait_for(covered, timeout=timeout, interval=0.5, message="recorder coverage")
    return recorded, stored


@contextlib.asynccontextmanager
async def connected_service(
    env: dict[str, str], influxdb: InfluxDB1, influx_db: str
) -> AsyncIterator[RunningService]:
    """The service, once its Home Assistant source is connected."""
    async with run_service(env, influxdb, influx_db) as service:
        await wait_for(lambda: service.service.telemetry.is_connected("homeassistant"), timeout=30)
        yield service


@pytest.fixture
async def ha_service(
    tmp_path: Path, home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str
) -> AsyncIterator[RunningService]:
    env = service_env(
        tmp_path, influxdb, influx_db, ha_url=home_assistant.url, ha_token=home_assistant.token
    )
    del env["HA_INGESTOR_INSTANCE"]  # the instance tag comes from Home Assistant's location name
    async with connected_service(env, influxdb, influx_db) as service:
        yield service


async def test_every_state_change_and_event_is_stored_and_matches_the_recorder(
    ha_service: RunningService, home_assistant: HomeAssistant
) -> None:
    service = ha_service
    ha = home_assistant
    since = time.time()
    clients, per_client = 8, 60
    await asyncio.to_thread(burst_of_state_changes, ha, "burst", clients, per_client)
    changes = clients * per_client
    await asyncio.to_thread(switch_and_script, ha, 5)
    await asyncio.to_thread(ha.set_state, "sensor.burst_gone", "unavailable")
    await asyncio.to_thread(ha.api, "DELETE", "/api/states/sensor.burst_gone")

    recorded, stored = await wait_for_coverage(service, ha, since, {"sensor.burst_": changes})
    burst_points = {
        s for s in stored if s[0].startswith("sensor.burst_") and s[0] != "sensor.burst_gone"
    }
    assert len(burst_points) == changes, "one ha_state point per state change"
    assert recorded - stored == set(), "every recorder row is in InfluxDB"
    assert stored - recorded == set(), "every point has its row in the recorder (removal too)"
    assert stored_point_count(service, since) == len(stored), "no duplicates"

    rows = service.influx.rows(
        f"SELECT * FROM ha_state WHERE entity_id = 'sensor.burst_0' AND time >= {int(since * 1e9)}",
        service.database,
    )
    first = rows[0]
    assert first["domain"] == "sensor"
    assert first["unit"] == "°C"
    assert first["device_class"] == "temperature"
    assert first["instance"] == "Test Home"
    assert first["state"] == "0.0"
    assert first["value"] == 0.0
    assert first["attr_sequence"] == 0.0
    assert json.loads(first["attributes"])["sequence"] == 0
    assert first["context_id"] is None, "set through the REST API: no stored event shares it"

    removed = service.influx.rows(
        f"SELECT * FROM ha_state WHERE entity_id = 'sensor.burst_gone' AND time >= {int(since * 1e9)}",
        service.database,
    )
    assert [r["state"] for r in removed] == ["unavailable", ""]
    assert removed[-1]["removed"] is True

    def events(where: str) -> list[dict[str, object]]:
        return service.influx.rows(
            f"SELECT * FROM ha_event WHERE {where} AND time >= {int(since * 1e9)}", service.database
        )

    await wait_for(lambda: len(events("event_type = 'script_started'")) == 5, timeout=30)
    calls = events("event_type = 'call_service' AND domain = 'input_boolean'")
    assert len(calls) == 10
    assert {c["service"] for c in calls} == {"turn_on", "turn_off"}
    assert {c["entity_id"] for c in calls} == {"input_boolean.test_switch"}
    automations = events("event_type = 'automation_triggered'")
    assert len(automations) == 5
    assert automations[0]["entity_id"] == "automation.level_up_when_the_switch_turns_on"
    assert automations[0]["name"] == "Level up when the switch turns on"
    scripts = events("event_type = 'script_started'")
    assert scripts[0]["entity_id"] == "script.bump_level"
    assert json.loads(str(scripts[0]["data"]))["name"] == "Bump level"

    log = ha.log_text().lower()
    assert "pending messages" not in log, "no slow-consumer disconnects"
    assert "slow" not in log
    assert service.metric("ha_ingestor_events_received_total", source="homeassistant") > changes


async def test_a_restart_of_home_assistant_is_backfilled_without_duplicates(
    tmp_path: Path, fresh_home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str
) -> None:
    ha = fresh_home_assistant
    env = service_env(tmp_path, influxdb, influx_db, ha_url=ha.url, ha_token=ha.token)
    since = time.time()
    async with connected_service(env, influxdb, influx_db) as service:
        await asyncio.to_thread(burst_of_state_changes, ha, "before", 2, 20)
        await asyncio.to_thread(ha.stop)
        await wait_for(
            lambda: not service.service.telemetry.is_connected("homeassistant"), timeout=30
        )
        await asyncio.to_thread(ha.start)
        # Changes right after Home Assistant is back, while the ingestor is still reconnecting.
        await asyncio.to_thread(burst_of_state_changes, ha, "during", 2, 20)
        await wait_for(lambda: service.service.telemetry.is_connected("homeassistant"), timeout=60)
        await asyncio.to_thread(burst_of_state_changes, ha, "after", 2, 20)
        recorded, stored = await wait_for_coverage(
            service, ha, since, {"sensor.before_": 40, "sensor.during_": 40, "sensor.after_": 40}
        )
        assert recorded - stored == set(), "every change made around the restart is stored"
        assert stored_point_count(service, since) == len(stored), "no duplicates"
        await wait_backfill_counted(service, 1)
        assert service.service.telemetry.connections["homeassistant"].reconnects >= 1


async def test_a_wrong_token_fails_clearly_without_a_reconnect_storm(
    tmp_path: Path, home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str
) -> None:
    env = service_env(
        tmp_path, influxdb, influx_db, ha_url=home_assistant.url, ha_token="not-a-valid-token"
    )
    async with run_service(env, influxdb, influx_db) as service:
        telemetry = service.service.telemetry
        await wait_for(
            lambda: (
                "homeassistant" in telemetry.connections
                and telemetry.connections["homeassistant"].state.value == "failed"
            ),
            timeout=30,
        )
        await asyncio.sleep(3)  # a storm would show up as more attempts by now
        source = service.service.sources["homeassistant"]
        assert source.connection_attempts == 1
        status, body = await service.get("/readyz")
        assert status == 503
        assert "auth_invalid" in json.loads(body)["not_ready"]["homeassistant"]
        status, _ = await service.get("/healthz")
        assert status == 200
        errors = [e for e in telemetry.recent_errors if e.component == "homeassistant"]
        assert len(errors) == 1
        assert "not-a-valid-token" not in errors[0].error


async def test_an_ingestor_restart_backfills_from_the_persisted_checkpoint(
    tmp_path: Path, home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str
) -> None:
    ha = home_assistant
    env = service_env(tmp_path, influxdb, influx_db, ha_url=ha.url, ha_token=ha.token)
    since = time.time()
    async with connected_service(env, influxdb, influx_db) as service:
        await asyncio.to_thread(burst_of_state_changes, ha, "running", 2, 20)
        await wait_for(
            lambda: len(stored_states(service, since, "sensor.running_")) == 40, timeout=30
        )
        await asyncio.sleep(1.5)  # the checkpoint is saved once a second
    # The ingestor is stopped: these changes happen while nobody listens.
    await asyncio.to_thread(burst_of_state_changes, ha, "stopped", 2, 20)
    # Same spool, same checkpoint.
    async with connected_service(env, influxdb, influx_db) as service:
        recorded, stored = await wait_for_coverage(
            service, ha, since, {"sensor.running_": 40, "sensor.stopped_": 40}
        )
        mine = {s for s in recorded if s[0].startswith(("sensor.running_", "sensor.stopped_"))}
        assert len(mine) == 80
        assert mine <= stored, "the changes made while the ingestor was stopped were back-filled"
        assert stored_point_count(service, since) == len(stored), "no duplicates"
        await wait_backfill_counted(service, 40)


def changes_at_a_pace(ha: HomeAssistant, prefix: str, count: int, pause: float) -> None:
    """``count`` state changes over two entities, one at a time with ``pause`` between."""
    for i in range(count):
        ha.set_state(f"sensor.{prefix}_{i % 2}", str(i), {"sequence": i})
        time.sleep(pause)


def stored_in(influxdb: InfluxDB1, database: str, since: float, prefix: str) -> list[int]:
    """The time (µs) of every ha_state point of ``sensor.<prefix>_*``, duplicates kept apart."""
    rows = influxdb.rows(
        f"SELECT state FROM ha_state WHERE time >= {int(since * 1e9)} "
        f"AND entity_id =~ /^sensor\\.{prefix}_/ GROUP BY entity_id",
        database,
    )
    return [row["time"] // 1000 for row in rows]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_the_ingestor_stopped_while_states_change_stores_each_recorded_state_once(
    sig: signal.Signals,
    tmp_path: Path,
    home_assistant: HomeAssistant,
    influxdb: InfluxDB1,
    influx_db: str,
) -> None:
    ha = home_assistant
    prefix = f"stopped_{sig.name.lower()}_{int(time.time() * 1000) % 100000}"
    env = service_env(tmp_path, influxdb, influx_db, ha_url=ha.url, ha_token=ha.token)
    since = time.time()
    with ingestor_process(env, tmp_path / "ingestor.log") as ingestor:
        await ingestor.wait_ready()
        changing = asyncio.create_task(asyncio.to_thread(changes_at_a_pace, ha, prefix, 100, 0.03))
        await wait_for(
            lambda: len(stored_in(influxdb, influx_db, since, prefix)) >= 10,
            timeout=30,
            message="the first points stored",
        )
        assert not changing.done(), "stopped while the states change"
        await ingestor.stop(sig, timeout=30)
        await changing
        ingestor.start()
        await ingestor.wait_ready()
        recorded: set[tuple[str, int]] = set()
        stored: list[int] = []

        def complete() -> bool:
            nonlocal recorded, stored
            recorded = ha.recorded_states(since, f"sensor.{prefix}_")
            stored = stored_in(influxdb, influx_db, since, prefix)
            return len(recorded) == 100 and sorted(stored) == sorted(t for _, t in recorded)

        with contextlib.suppress(TimeoutError):
            await wait_for(complete, timeout=90, interval=0.5, message="every state stored")
    assert len(recorded) == 100
    assert sorted(stored) == sorted(t for _, t in recorded), "each recorded state exactly once"


def rows_stored(influxdb: InfluxDB1, database: str, count: int) -> Callable[[], bool]:
    return lambda: len(mqtt_rows(influxdb, database)) == count


async def test_the_instance_is_decided_before_the_first_point_and_kept(
    tmp_path: Path,
    home_assistant: HomeAssistant,
    mosquitto: Mosquitto,
    influxdb: InfluxDB1,
    influx_db: str,
    topic_prefix: str,
) -> None:
    """MQTT points carry Home Assistant's location name from the first one on; a later run
    that cannot reach Home Assistant keeps the instance decided before."""
    ha = home_assistant
    env = service_env(tmp_path, influxdb, influx_db, mosquitto, ha_url=ha.url, ha_token=ha.token)
    del env["HA_INGESTOR_INSTANCE"]
    env["HA_INGESTOR_MQTT_TOPICS"] = f"{topic_prefix}/#"
    for run, ha_url in enumerate([ha.url, f"http://127.0.0.1:{free_port()}"]):
        env["HA_INGESTOR_HA_URL"] = ha_url  # the second run: nothing listens there
        async with run_service(env, influxdb, influx_db):
            # Published at once: before the Home Assistant source has connected.
            await publish_many(mosquitto.host, mosquitto.port, numbered(topic_prefix, run * 10, 10))
            await wait_for(rows_stored(influxdb, influx_db, (run + 1) * 10))
    instances = {row["instance"] for row in mqtt_rows(influxdb, influx_db)}
    assert instances == {"Test Home"}
