from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.service import RunningService, run_service, service_env
from tests.support.servers import InfluxDB1, Mosquitto


@pytest.fixture
async def running_service(
    tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, influx_db: str, topic_prefix: str
) -> AsyncIterator[RunningService]:
    env = service_env(
        tmp_path,
        influxdb,
        influx_db,
        mosquitto,
        mqtt_topics=f"{topic_prefix}/#",
        mqtt_max_payload_bytes="1024",
    )
    async with run_service(env, influxdb, influx_db) as service:
        yield service
