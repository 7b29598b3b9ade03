"""Run the real service in-process against the test servers, and read what it stored."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from ha_ingestor.app import Service
from ha_ingestor.config import load_settings
from tests.support.mqtt_publisher import Message
from tests.support.servers import InfluxDB1, Mosquitto
from tests.support.waiting import wait_for


class RunningService:
    def __init__(
        self, service: Service, influx: InfluxDB1, database: str, registry: CollectorRegistry
    ):
        self.service = service
        self.influx = influx
        self.database = database
        self.registry = registry
        settings = service.settings
        self.mqtt_host = settings.mqtt_host or ""
        self.mqtt_port = settings.effective_mqtt_port
        self.prefix = settings.mqtt_topics[0].removesuffix("/#")

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.service.http_port}"

    def count(self, measurement: str) -> int:
        return self.influx.count(self.database, measurement)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def get(self, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.http_url + path) as response,
        ):
            return response.status, await response.text()


def service_env(
    tmp_path: Path,
    influx: InfluxDB1,
    database: str,
    mosquitto: Mosquitto | None = None,
    **extra: str,
) -> dict[str, str]:
    env = {
        "HA_INGESTOR_INFLUX_URL": influx.url,
        "HA_INGESTOR_INFLUX_DATABASE": database,
        "HA_INGESTOR_SPOOL_DIR": str(tmp_path / "spool"),
        "HA_INGESTOR_HTTP_HOST": "127.0.0.1",
        "HA_INGESTOR_HTTP_PORT": "0",
        "HA_INGESTOR_INSTANCE": "test-instance",
        "HA_INGESTOR_INFLUX_FLUSH_INTERVAL": "0.2",
        "HA_INGESTOR_SHUTDOWN_TIMEOUT": "5",
        "HA_INGESTOR_HA_BACKFILL_SETTLE": "3",
    }
    if mosquitto is not None:
        env |= {
            "HA_INGESTOR_MQTT_HOST": mosquitto.host,
            "HA_INGESTOR_MQTT_PORT": str(mosquitto.port),
            "HA_INGESTOR_MQTT_CLIENT_ID": f"ingestor-{database}",
        }
    env |= {f"HA_INGESTOR_{k.upper()}": v for k, v in extra.items()}
    return env


@contextlib.asynccontextmanager
async def run_service(
    env: dict[str, str], influx: InfluxDB1, database: str
) -> AsyncIterator[RunningService]:
    registry = CollectorRegistry()
    service = Service(load_settings(env), registry)
    task = asyncio.create_task(service.run())
    ready = asyncio.create_task(service.ready.wait())
    await asyncio.wait([task, ready], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert service.ready.is_set(), "service did not start"
    if service.settings.mqtt_enabled:  # subscribed: nothing published from now on is missed
        with contextlib.suppress(TimeoutError):  # a test of an unreachable broker goes on
            await wait_for(lambda: service.telemetry.is_connected("mqtt"), timeout=30)
    try:
        yield RunningService(service, influx, database, registry)
    finally:
        service.stop()
        await asyncio.wait_for(task, 30)


def field_types(influx: InfluxDB1, database: str, measurement: str) -> dict[str, str]:
    series = influx.query(f'SHOW FIELD KEYS FROM "{measurement}"', database)
    return dict(series[0]["values"])


def mqtt_rows(influx: InfluxDB1, database: str) -> list[dict[str, Any]]:
    return influx.rows("SELECT * FROM mqtt_message", database)


def numbered(prefix: str, start: int, count: int, qos: int = 1) -> list[Message]:
    """Messages whose payloads are the numbers ``start`` … ``start + count - 1``."""
    return [
        Message(f"{prefix}/n/{i % 50}", str(i).encode(), qos) for i in range(start, start + count)
    ]
