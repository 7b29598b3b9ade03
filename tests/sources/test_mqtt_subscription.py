"""A subscription the broker refuses: ``check`` names the filter, ``run`` says so and retries,
and nothing else is refused with it."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from ha_ingestor.checks import check_mqtt
from ha_ingestor.config import load_settings
from ha_ingestor.errors import CheckError
from ha_ingestor.pipeline.buffer import MemoryBuffer
from ha_ingestor.sources.mqtt import MqttSource
from ha_ingestor.telemetry import ConnState, Telemetry
from tests.sources.scripted_broker import ScriptedBroker
from tests.support.servers import HOST
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(30)


def settings_for(broker: ScriptedBroker, topics: str) -> dict[str, str]:
    return {
        "HA_INGESTOR_MQTT_HOST": HOST,
        "HA_INGESTOR_MQTT_PORT": str(broker.port),
        "HA_INGESTOR_MQTT_PROTOCOL": "5",
        "HA_INGESTOR_MQTT_TOPICS": topics,
        "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:1",
    }


async def test_check_subscribes_as_run_does_and_names_the_refused_filter(
    broker: ScriptedBroker,
) -> None:
    broker.refuse = {"secret/#"}
    allowed = load_settings(settings_for(broker, "allowed/#"))
    assert "subscribed to allowed/#" in await check_mqtt(allowed)
    # The discovery topics are subscribed to as well, as the service does.
    assert broker.subscriptions[-1] == [
        "allowed/#",
        "homeassistant/+/+/config",
        "homeassistant/+/+/+/config",
    ]
    refused = load_settings(settings_for(broker, "allowed/#,secret/#"))
    with pytest.raises(CheckError) as failure:
        await check_mqtt(refused)
    message = str(failure.value)
    assert "refused the subscription to secret/#" in message
    assert "allowed/#" not in message.split("refused")[1]
    assert "HA_INGESTOR_MQTT_TOPICS" in message


async def test_a_refused_subscription_is_reported_and_retried(broker: ScriptedBroker) -> None:
    broker.refuse = {"secret/#"}
    telemetry = Telemetry(CollectorRegistry())
    settings = load_settings(settings_for(broker, "secret/#"))
    source = MqttSource(settings, MemoryBuffer(), telemetry, "test")
    task = asyncio.create_task(source.run())
    try:
        await wait_for(lambda: len(broker.subscriptions) >= 2, timeout=20, message="a retry")
        connection = telemetry.connection("mqtt")
        assert connection.state is ConnState.RECONNECTING
        assert connection.last_error is not None
        assert "refused the subscription to secret/#" in connection.last_error
        assert not task.done(), "the source stays up and retries"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
