"""A home wider than InfluxDB 3 Core's 500 columns per table: over 1,000 distinct JSON leaves and
over 300 distinct numeric attributes. Every message and every state is stored, nothing is
dead-lettered and the service stays ready — on the InfluxDB 3 stand-in and on a real InfluxDB
1.6.7."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.e2e.service import RunningService, run_service, service_env
from tests.support.homeassistant import HomeAssistant
from tests.support.influxdb_standin import InfluxStandIn, serve
from tests.support.mqtt_publisher import Message, Publisher
from tests.support.servers import InfluxDB1, Mosquitto
from tests.support.waiting import wait_for

MODELS = 120  # device models, each with its own leaves
LEAVES_PER_MODEL = 9
SENSORS = 520  # each with a numeric attribute of its own: more than ha_state has room for
LEFT_OUT = "ha_ingestor_fields_left_out_total"


def wide_messages(prefix: str) -> list[Message]:
    messages = []
    for model in range(MODELS):
        leaves = {f"model{model}_leaf{j}": model + j / 10 for j in range(LEAVES_PER_MODEL)}
        for device in range(2):
            payload = json.dumps({**leaves, "linkquality": 100 + device}).encode()
            messages.append(Message(f"{prefix}/z2m/model{model}_{device}", payload, 1))
    health = {f"0x{address:016x}": {"leave_count": 1, "messages": address} for address in range(60)}
    messages.append(Message(f"{prefix}/z2m/bridge/health", json.dumps(health).encode(), 1))
    return messages


async def set_wide_states(ha: HomeAssistant, prefix: str) -> None:
    def one(index: int) -> None:
        ha.set_state(
            f"sensor.{prefix}_{index}",
            str(index),
            {"friendly_name": f"Wide {index}", f"reading_{index}": index * 1.5},
        )

    for start in range(0, SENSORS, 40):
        await asyncio.gather(*(asyncio.to_thread(one, i) for i in range(start, start + 40)))


async def ready_throughout(service: RunningService, done: asyncio.Event) -> list[int]:
    """/readyz answers while the workload runs."""
    answers = []
    while not done.is_set():
        status, _ = await service.get("/readyz")
        answers.append(status)
        await asyncio.sleep(0.2)
    return answers


@asynccontextmanager
async def v3_target() -> AsyncIterator[
    tuple[dict[str, str], Callable[[str], int], Callable[[str], int]]
]:
    async with serve(InfluxStandIn("v3")) as standin:
        env = {"influx_url": standin.url, "influx_api": "v3", "influx_token": standin.token}

        def rows(measurement: str) -> int:
            tables = standin.databases.get("wide", None)
            return (
                len(standin.rows("wide", measurement))
                if tables and measurement in tables.tables
                else 0
            )

        def columns(measurement: str) -> int:
            return standin.databases["wide"].tables[measurement].columns()

        yield env, rows, columns


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", ["v3-standin", "v1-real"])
async def test_a_home_wider_than_500_columns_loses_nothing(
    target: str,
    tmp_path: Path,
    home_assistant: HomeAssistant,
    mosquitto: Mosquitto,
    influxdb: InfluxDB1,
    influx_db: str,
    topic_prefix: str,
) -> None:
    prefix = f"wide_{target.replace('-', '_')}"
    database = "wide" if target == "v3-standin" else influx_db
    async with v3_target() as (v3_env, v3_rows, v3_columns):
        extra = {
            "mqtt_topics": f"{topic_prefix}/#",
            "ha_url": home_assistant.url,
            "ha_token": home_assistant.token,
            "ha_include_entities": f"sensor.{prefix}_*",
            "influx_database": database,
        }
        if target == "v3-standin":
            extra |= v3_env

            def count(measurement: str) -> int:
                return v3_rows(measurement)
        else:

            def count(measurement: str) -> int:
                return influxdb.count(database, measurement)

        env = service_env(tmp_path, influxdb, database, mosquitto, **extra)
        async with run_service(env, influxdb, database) as service:
            await wait_for(
                lambda: service.service.telemetry.is_connected("homeassistant"), 60, message="HA"
            )
            done = asyncio.Event()
            readiness = asyncio.create_task(ready_throughout(service, done))
            messages = wide_messages(topic_prefix)
            with Publisher(mosquitto.host, mosquitto.port, client_id=f"wide-{target}") as pub:
                await asyncio.to_thread(pub.publish_many, messages)
            await set_wide_states(home_assistant, prefix)

            async def stored(measurement: str, expected: int) -> bool:
                return await asyncio.to_thread(count, measurement) == expected

            await wait_for(lambda: stored("mqtt_message", len(messages)), 90, 0.5, "messages")
            await wait_for(lambda: stored("ha_state", SENSORS), 90, 0.5, "states")
            done.set()
            answers = await readiness
            left_out = service.metric(LEFT_OUT, measurement="mqtt_message", reason="column_budget")
            attrs_left_out = service.metric(
                LEFT_OUT, measurement="ha_state", reason="column_budget"
            )
            dead_letters = (tmp_path / "spool" / "dead-letter.jsonl").exists()
        assert answers
        assert set(answers) == {200}, "ready throughout"
        assert not dead_letters
        assert left_out > 0, "leaves past the budget were left out of columns, not messages"
        assert attrs_left_out > 0
        if target == "v3-standin":
            assert v3_columns("mqtt_message") <= 500
            assert v3_columns("ha_state") <= 500
