"""The Home Assistant test fixture itself: a working token, events on the WebSocket, rows in
the recorder, and restarts that keep all of it."""

from __future__ import annotations

import asyncio
import time

import pytest

from ha_ingestor.pipeline.ha_events import parse_time_ns
from tests.support.homeassistant import CommandFailedError, HomeAssistant

pytestmark = [pytest.mark.homeassistant, pytest.mark.timeout(300)]


async def test_a_state_set_over_rest_reaches_the_websocket_and_the_recorder(
    home_assistant: HomeAssistant,
) -> None:
    ha = home_assistant
    config = await asyncio.to_thread(ha.api, "GET", "/api/config")
    assert config["location_name"] == "Test Home"
    assert config["state"] == "RUNNING"
    since = time.time() - 1
    async with ha.websocket() as ws:
        await ws.subscribe("state_changed")
        stored = await asyncio.to_thread(
            ha.set_state, "sensor.fixture_probe", "42", {"unit_of_measurement": "W"}
        )
        event = await ws.next_event()
        while event["data"]["entity_id"] != "sensor.fixture_probe":
            event = await ws.next_event()
    new_state = event["data"]["new_state"]
    assert new_state["state"] == "42"
    assert new_state["last_updated"] == stored["last_updated"]
    assert event["time_fired"] == new_state["last_updated"]

    rows = await asyncio.to_thread(ha.wait_recorded, since, "sensor.fixture_probe", 1)
    assert rows == {("sensor.fixture_probe", parse_time_ns(stored["last_updated"]) // 1000)}


async def test_the_configuration_provides_the_entities_tests_rely_on(
    home_assistant: HomeAssistant,
) -> None:
    states = {
        s["entity_id"]: s for s in await asyncio.to_thread(home_assistant.api, "GET", "/api/states")
    }
    for entity_id in (
        "input_boolean.test_switch",
        "input_boolean.sensor_available",
        "input_number.test_level",
        "sensor.doubled_level",
        "sensor.guarded_level",
        "sensor.switch_echo",
        "automation.level_up_when_the_switch_turns_on",
        "script.bump_level",
    ):
        assert entity_id in states, entity_id
    doubled = states["sensor.doubled_level"]["attributes"]
    assert doubled["unit_of_measurement"] == "W"
    assert doubled["device_class"] == "power"
    async with home_assistant.websocket() as ws:
        entities = {e["entity_id"]: e for e in await ws.call("config/entity_registry/list")}
    assert entities["sensor.doubled_level"]["platform"] == "template"


async def test_a_user_token_is_not_an_admin_token(home_assistant: HomeAssistant) -> None:
    token = await home_assistant.create_user("fixture-user", "fixture-password-1")
    async with home_assistant.websocket(token) as ws:
        await ws.subscribe("state_changed")  # allowed for everyone
        with pytest.raises(CommandFailedError) as refused:
            await ws.subscribe()  # all events: administrators only
    assert refused.value.code == "unauthorized"


def test_restart_and_kill_keep_port_token_and_recorder(
    fresh_home_assistant: HomeAssistant,
) -> None:
    ha = fresh_home_assistant
    since = time.time() - 1
    first = ha.set_state("sensor.restart_probe", "1")
    assert ha.wait_recorded(since, "sensor.restart_probe", 1)
    pid = ha.process.pid if ha.process else None
    ha.restart()
    assert ha.process is not None
    assert ha.process.pid != pid
    assert ha.api("GET", "/api/config")["state"] == "RUNNING"  # same URL, same token
    second = ha.set_state("sensor.restart_probe", "2")
    assert len(ha.wait_recorded(since, "sensor.restart_probe", 2)) == 2  # committed before the kill
    ha.restart(kill=True)
    third = ha.set_state("sensor.restart_probe", "3")
    rows = ha.wait_recorded(since, "sensor.restart_probe", 3)
    expected = {parse_time_ns(s["last_updated"]) // 1000 for s in (first, second, third)}
    assert expected <= {ts for _, ts in rows}
    assert len(ha.startup_seconds) == 3
