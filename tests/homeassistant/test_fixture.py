import time

import pytest

from tests.support.homeassistant import HomeAssistant

pytestmark = pytest.mark.homeassistant


def test_token_works_and_states_reach_the_recorder(home_assistant: HomeAssistant) -> None:
    config = home_assistant.api("GET", "/api/config")
    assert config["location_name"] == "Test Home"
    since = time.time() - 1
    home_assistant.set_state("sensor.fixture_probe", "42", {"unit_of_measurement": "W"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if home_assistant.recorded_states(since, "sensor.fixture_probe"):
            break
        time.sleep(0.1)
    assert len(home_assistant.recorded_states(since, "sensor.fixture_probe")) == 1
