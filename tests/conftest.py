"""Real servers for the whole suite: one Mosquitto and one InfluxDB 1.x per session, fresh
databases and topics per test, and function-scoped servers for tests that kill them.

Home Assistant: every test that uses ``home_assistant``, ``fresh_home_assistant`` or
``ha_release`` runs once per tested release (:data:`tests.support.homeassistant.RELEASES`),
with ids ``ha2026.11.0`` / ``ha2024.3.3``."""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.homeassistant import RELEASES, HomeAssistant, Release
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


@pytest.fixture(scope="session", params=RELEASES, ids=[r.id for r in RELEASES])
def ha_release(request: pytest.FixtureRequest) -> Release:
    """The Home Assistant release of this test run."""
    release: Release = request.param
    return release


@pytest.fixture(scope="session")
def shared_home_assistant(
    ha_release: Release, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HomeAssistant]:
    directory = tmp_path_factory.mktemp(f"homeassistant-{ha_release.version}")
    with started(HomeAssistant(directory, ha_release)) as server:
        yield server


@pytest.fixture
def home_assistant(shared_home_assistant: HomeAssistant) -> HomeAssistant:
    """One Home Assistant per release for the session. Tests must not stop it or rely on its
    entities being untouched by other tests: use entity ids of their own.

    Should it have died or stopped answering since the last test, it is restarted (same port,
    token and recorder) with a warning that carries its log tail: one crash of Home Assistant
    fails the test it happened in, not every test after it."""
    ha = shared_home_assistant
    if not answers(ha):
        code = ha.process.poll() if ha.process else None
        what = f"exited with {code}" if code is not None else "stopped answering"
        warnings.warn(
            f"the shared Home Assistant {ha.release.version} {what}; restarting it. "
            f"Log tail:\n{ha.log_tail()}",
            stacklevel=1,
        )
        ha.restart(kill=True)
    return ha


def answers(ha: HomeAssistant, tries: int = 5) -> bool:
    """Running and answering HTTP (a busy machine gets a few seconds)."""
    for _ in range(tries):
        if not ha.running:
            return False
        if ha.is_up():
            return True
        time.sleep(1)
    return False


@pytest.fixture
def fresh_home_assistant(ha_release: Release, tmp_path: Path) -> Iterator[HomeAssistant]:
    """A Home Assistant of the test's own, for tests that stop, kill or restart it."""
    with started(HomeAssistant(tmp_path / "homeassistant", ha_release)) as server:
        yield server
