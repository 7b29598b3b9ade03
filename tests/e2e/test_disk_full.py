"""The spool on a small disk of its own (a 6 MB tmpfs): it fills, becomes read-only, loses its
file — and the service rides it out: nothing acknowledged is lost, every message lands once."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.service import RunningService, run_service, service_env
from tests.e2e.test_faults import stored_numbers, wait_for_numbers
from tests.support.faulty_proxy import FaultyProxy
from tests.support.ingestor import ingestor_process
from tests.support.mqtt_publisher import Message, publish_many
from tests.support.servers import HOST, InfluxDB1, Mosquitto
from tests.support.small_disk import read_only, small_disk
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOTAL = 30_000


def padded(prefix: str, start: int, count: int) -> list[Message]:
    """QoS 1 messages whose payloads are numbers and whose points are ~330 bytes each."""
    return [
        Message(f"{prefix}/{'p' * 150}/{i % 50}", str(i).encode(), 1)
        for i in range(start, start + count)
    ]


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_disk(tmp_path / "disk", "6m") as path:
        yield path


def disk_env(
    tmp_path: Path, disk: Path, influx: InfluxDB1, database: str, mosquitto: Mosquitto, **extra: str
) -> dict[str, str]:
    topics = f"t-{database}/#"
    return service_env(
        tmp_path,
        influx,
        database,
        mosquitto,
        mqtt_topics=topics,
        spool_dir=str(disk / "spool"),
        spool_min_free_bytes="0",  # no margin: the disk itself fills
        **extra,
    )


async def status(service: RunningService) -> dict[str, Any]:
    code, body = await service.get("/status")
    assert code == 200
    result: dict[str, Any] = json.loads(body)
    return result


async def storage_state(service: RunningService) -> str:
    state: str = (await status(service))["buffer"]["storage"]["state"]
    return state


class Watch:
    """Polls ``/readyz`` and ``/healthz`` all along: what readiness said, and that the process
    always answered."""

    def __init__(self, service: RunningService) -> None:
        self.ready: list[tuple[int, str]] = []
        self.health_failures = 0
        self._task = asyncio.create_task(self._run(service))

    async def _run(self, service: RunningService) -> None:
        while True:
            self.ready.append(await service.get("/readyz"))
            if (await service.get("/healthz"))[0] != 200:
                self.health_failures += 1
            await asyncio.sleep(0.2)

    def spool_reasons(self) -> list[str]:
        reasons = []
        for code, body in self.ready:
            if code == 503:
                reason = json.loads(body)["not_ready"].get("spool")
                if reason:
                    reasons.append(reason)
        return reasons

    def stop(self) -> None:
        self._task.cancel()


async def test_disk_full_during_an_outage_every_message_lands_once_without_a_restart(
    tmp_path: Path, disk: Path, mosquitto: Mosquitto, fresh_influxdb: InfluxDB1
) -> None:
    influx, database = fresh_influxdb, "diskfull"
    prefix = f"t-{database}"
    env = disk_env(tmp_path, disk, influx, database, mosquitto)
    async with run_service(env, influx, database) as service:
        await wait_for(lambda: service.service.telemetry.is_connected("influxdb"), timeout=30)
        watch = Watch(service)
        await asyncio.to_thread(influx.kill)
        await publish_many(mosquitto.host, mosquitto.port, padded(prefix, 0, TOTAL))
        await wait_for(
            lambda: _is(storage_state(service), "disk_full"), timeout=60, message="disk full"
        )
        code, body = await service.get("/readyz")
        assert code == 503
        reason = json.loads(body)["not_ready"]["spool"]
        assert reason.startswith("disk_full since")
        assert str(disk / "spool") in reason
        buffer = (await status(service))["buffer"]
        assert buffer["durable"] is False
        assert buffer["storage"]["state"] == "disk_full"
        # Reading paused: the broker holds what is not read, nothing is acknowledged.
        await wait_for(lambda: service.metric("ha_ingestor_queue_depth", queue="mqtt_paused") == 1)
        assert buffer["lines"] > 0
        assert service.metric("ha_ingestor_spool_errors_total", reason="disk_full") >= 1
        # InfluxDB comes back: everything drains, space returns, reading resumes by itself.
        await asyncio.to_thread(influx.start)
        numbers = await wait_for_numbers(influx, database, TOTAL, timeout=180)
        assert numbers == list(range(TOTAL))
        await wait_for(lambda: _is(storage_state(service), "ok"), timeout=30)
        await wait_for(lambda: _code(service, "/readyz", 200), timeout=30)
        watch.stop()
        assert watch.health_failures == 0
        assert watch.spool_reasons()
        assert service.metric("ha_ingestor_spool_durable") == 1
        dropped = service.metric(
            "ha_ingestor_events_dropped_total", reason="spool_full", intentional="true"
        )
        assert dropped == 0


async def test_disk_full_while_influxdb_is_slow_every_message_lands_once(
    tmp_path: Path, disk: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, influx_db: str
) -> None:
    async with FaultyProxy(influxdb.url, delay=1.0) as proxy:
        prefix = f"t-{influx_db}"
        env = disk_env(tmp_path, disk, influxdb, influx_db, mosquitto)
        env |= {"HA_INGESTOR_INFLUX_URL": proxy.url, "HA_INGESTOR_INFLUX_BATCH_SIZE": "2000"}
        async with run_service(env, influxdb, influx_db) as service:
            watch = Watch(service)
            await publish_many(mosquitto.host, mosquitto.port, padded(prefix, 0, TOTAL))
            numbers = await wait_for_numbers(influxdb, influx_db, TOTAL, timeout=240)
            assert numbers == list(range(TOTAL))
            watch.stop()
            assert service.metric("ha_ingestor_spool_errors_total", reason="disk_full") >= 1
            assert any(r.startswith("disk_full since") for r in watch.spool_reasons())
            assert watch.health_failures == 0
            await wait_for(lambda: _is(storage_state(service), "ok"), timeout=30)


async def test_read_only_spool_directory_and_deleted_spool_file_lose_nothing_acknowledged(
    tmp_path: Path, mosquitto: Mosquitto, fresh_influxdb: InfluxDB1
) -> None:
    influx, database = fresh_influxdb, "readonly"
    prefix = f"t-{database}"
    spool_dir = tmp_path / "spool"
    env = service_env(tmp_path, influx, database, mosquitto, mqtt_topics=f"{prefix}/#")
    async with run_service(env, influx, database) as service:
        await wait_for(lambda: service.service.telemetry.is_connected("influxdb"), timeout=30)
        await asyncio.to_thread(influx.kill)  # everything acknowledged lives only in the spool
        await publish_many(mosquitto.host, mosquitto.port, padded(prefix, 0, 3000))
        await wait_for(lambda: _received(service) >= 3000)

        with read_only(spool_dir):
            await publish_many(mosquitto.host, mosquitto.port, padded(prefix, 3000, 2000))
            await wait_for(lambda: _is(storage_state(service), "read_only"), timeout=30)
            code, body = await service.get("/readyz")
            assert code == 503
            reason = json.loads(body)["not_ready"]["spool"]
            assert reason.startswith("read_only since")
            assert "writable" in reason
            assert (await status(service))["buffer"]["durable"] is False
        await wait_for(lambda: _is(storage_state(service), "ok"), timeout=30)
        await wait_for(lambda: _received(service) >= 5000)

        (spool_dir / "spool.sqlite3").unlink()
        await publish_many(mosquitto.host, mosquitto.port, padded(prefix, 5000, 2000))
        await wait_for(lambda: _received(service) >= 7000)
        await wait_for(lambda: _is(storage_state(service), "ok"), timeout=30)
        assert service.metric("ha_ingestor_spool_errors_total", reason="read_only") >= 1
        assert service.metric("ha_ingestor_spool_errors_total", reason="missing") >= 1
        assert (spool_dir / "spool.sqlite3").exists()

        await asyncio.to_thread(influx.start)
        numbers = await wait_for_numbers(influx, database, 7000, timeout=120)
        assert numbers == list(range(7000))


async def test_sigterm_while_the_disk_is_full_exits_in_time_and_a_restart_stores_everything(
    tmp_path: Path, disk: Path, mosquitto: Mosquitto, fresh_influxdb: InfluxDB1
) -> None:
    influx, database = fresh_influxdb, "sigterm"
    prefix = f"t-{database}"
    env = disk_env(
        tmp_path,
        disk,
        influx,
        database,
        mosquitto,
        shutdown_timeout="10",
        mqtt_client_id=f"sigterm-{id(disk)}",
        log_level="WARNING",
    )
    log = tmp_path / "ingestor.log"
    with ingestor_process(env, log) as ingestor:
        await ingestor.wait_ready()
        await asyncio.to_thread(influx.kill)
        await publish_many(mosquitto.host, mosquitto.port, padded(prefix, 0, TOTAL))

        def state() -> str:
            url = f"http://{HOST}:{ingestor.port}/status"
            with urllib.request.urlopen(url, timeout=2) as response:
                value: str = json.load(response)["buffer"]["storage"]["state"]
            return value

        async def disk_full() -> bool:
            return await asyncio.to_thread(state) == "disk_full"

        await wait_for(disk_full, timeout=60)
        began = time.monotonic()
        assert await ingestor.stop(signal.SIGTERM, 20) == 0
        assert time.monotonic() - began < 11
        await asyncio.to_thread(influx.start)
        ingestor.start()  # the broker sends again what was never acknowledged
        numbers = await wait_for_numbers(influx, database, TOTAL, timeout=180)
    assert numbers == list(range(TOTAL)), log.read_text()[-2000:]
    assert "spool cannot store new data" in log.read_text()


async def _is(value: Any, expected: str) -> bool:
    return bool(await value == expected)


async def _code(service: RunningService, path: str, expected: int) -> bool:
    return (await service.get(path))[0] == expected


def _received(service: RunningService) -> float:
    return service.metric("ha_ingestor_events_received_total", source="mqtt")


__all__ = ["stored_numbers"]
