"""Real servers for the whole suite: one Mosquitto and one InfluxDB 1.x per session, fresh
databases and topics per test, and function-scoped servers for tests that kill them."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import InfluxDB1, Mosquitto, started

_counter = itertools.count()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with started(Mosquitto(tmp_path_factory.mktemp("mosquitto"))) as server:
        yield server


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB1]:
    with started(InfluxDB1(tmp_path_factory.mktemp("influxdb"))) as server:
        yield server


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    with started(Mosquitto(tmp_path / "mosquitto")) as server:
        yield server


@pytest.fixture
def fresh_influxdb(tmp_path: Path) -> Iterator[InfluxDB1]:
    with started(InfluxDB1(tmp_path / "influxdb")) as server:
        yield server


@pytest.fixture
def influx_db(influxdb: InfluxDB1) -> str:
    """A fresh, empty database name (not created: the service creates it)."""
    return f"test_{next(_counter)}_{id(influxdb) % 10000}"


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    return f"t{next(_counter)}/{request.node.name[:40]}"


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    from ha_ingestor.telemetry import configure_logging

    configure_logging("INFO", "console")
