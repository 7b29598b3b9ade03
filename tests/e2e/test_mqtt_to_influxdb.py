"""MQTT → InfluxDB end to end, against a real Mosquitto and a real InfluxDB 1.x."""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass

import pytest

from tests.e2e.service import RunningService, field_types, mqtt_rows
from tests.support.mqtt_publisher import Message, publish_many
from tests.support.waiting import wait_for

MAX_PAYLOAD = 1024  # the test service's HA_INGESTOR_MQTT_MAX_PAYLOAD_BYTES
AWKWARD_TOPICS = [
    "zigbee2mqtt/living room sensor",
    "tasmota/plug,1/SENSOR",
    "esphome/a=b/state",
    'quotes/"double"/state',
    "back\\slash/state",
    "ünïcödé/température/état",
    "emoji/🌡️/state",
    "trailing/backslash\\",
]


@dataclass
class Expected:
    topic: str
    payload: bytes
    fields: dict[str, object]


def _mixed_messages(prefix: str, count: int) -> list[Expected]:
    rng = random.Random(7)
    messages: list[Expected] = []
    for i in range(count):
        kind = i % 8
        fields: dict[str, object]
        topic = f"{prefix}/{AWKWARD_TOPICS[i % len(AWKWARD_TOPICS)]}/{i}"
        if kind == 0:
            temp = round(rng.uniform(-20, 40), 2)
            payload = json.dumps(
                {
                    "temperature": temp,
                    "battery": i % 100,
                    "occupancy": i % 2 == 0,
                    "state": "ON",
                    "update": {"installed_version": i},
                    "seq": i,
                }
            ).encode()
            fields = {
                "temperature": temp,
                "battery": float(i % 100),
                "occupancy": float(i % 2 == 0),
                "update.installed_version": float(i),
                "seq": float(i),
            }
        elif kind == 1:
            value = round(rng.uniform(0, 1000), 3)
            payload, fields = str(value).encode(), {"value": value}
        elif kind == 2:
            word = ["ON", "OFF", "open", "closed"][i % 4]
            payload = word.encode()
            fields = {"value": 1.0 if word in ("ON", "open") else 0.0}
        elif kind == 3:
            payload, fields = f'text "{i}" with \\ and, commas = signs\nnewline'.encode(), {}
        elif kind == 4:
            payload, fields = b"", {}
        elif kind == 5:
            payload = bytes([0xFF, 0xFE, i % 256, 0x80]) + b"binary"
            fields = {"encoding": "base64"}
        elif kind == 6:
            payload, fields = ("x" * 1500 + str(i)).encode(), {"truncated": True}
        else:
            payload, fields = b'{"broken json": ', {}
        messages.append(Expected(topic, payload, fields))
    return messages


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_ten_thousand_mixed_messages_all_land_with_the_right_fields(
    running_service: RunningService,
) -> None:
    service = running_service
    count = 10_000
    expected = _mixed_messages(service.prefix, count)
    await publish_many(
        service.mqtt_host,
        service.mqtt_port,
        [Message(m.topic, m.payload, qos=1) for m in expected],
    )
    await wait_for(lambda: service.count("mqtt_message") >= count, timeout=120)
    rows = mqtt_rows(service.influx, service.database)
    assert len(rows) == count
    by_topic = {row["topic"]: row for row in rows}
    assert len(by_topic) == count  # every topic is distinct: every message landed once
    for message in expected:
        row = by_topic[message.topic]
        assert row["instance"] == "test-instance"
        assert row["qos"] == 1
        assert row["retained"] is False
        assert row["size"] == len(message.payload)
        for name, value in message.fields.items():
            assert row[name] == value, (message.topic, name)
        if "encoding" in message.fields:
            assert base64.b64decode(row["payload"]) == message.payload
        elif "truncated" in message.fields:
            assert row["payload"] == message.payload[:MAX_PAYLOAD].decode()
        else:
            assert row["payload"] == message.payload.decode()
            assert row.get("truncated") is None
    types = field_types(service.influx, service.database, "mqtt_message")
    assert types["payload"] == "string"
    assert types["value"] == "float"
    assert types["qos"] == "integer"
    assert types["size"] == "integer"
    assert types["retained"] == "boolean"
    assert types["truncated"] == "boolean"
    assert types["temperature"] == "float"
    assert (
        service.metric("ha_ingestor_invalid_input_total", source="mqtt", reason="invalid_json")
        == count / 8
    )
    assert (
        service.metric("ha_ingestor_invalid_input_total", source="mqtt", reason="invalid_utf8")
        == count / 8
    )
