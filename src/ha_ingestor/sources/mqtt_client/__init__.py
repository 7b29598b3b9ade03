"""A small MQTT 5 / 3.1.1 subscriber client: a sans-io codec and an asyncio connection."""

from ha_ingestor.sources.mqtt_client.codec import MQTT_5, MQTT_311, MqttError, ProtocolError
from ha_ingestor.sources.mqtt_client.connection import (
    ConnectionLostError,
    ConnectOptions,
    ConnectRefusedError,
    MqttConnection,
    UnsupportedProtocolVersionError,
    ack_code,
)

__all__ = [
    "MQTT_5",
    "MQTT_311",
    "ConnectOptions",
    "ConnectRefusedError",
    "ConnectionLostError",
    "MqttConnection",
    "MqttError",
    "ProtocolError",
    "UnsupportedProtocolVersionError",
    "ack_code",
]
