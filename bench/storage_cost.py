"""Bytes on disk per Home Assistant state change and per MQTT message, against HA's own
``influxdb`` integration writing the same state changes to the same InfluxDB 1.x in the same run.

    python -m bench.storage_cost [--sensors 30] [--changes 100] [--messages 3000]

One InfluxDB 1.x (cache snapshots after 1 s cold, full compaction after 2 s cold), one Home
Assistant from the test harness with its ``influxdb`` integration writing to database
``ha_integration``, and the ingestor (defaults, Home Assistant source only) writing to
``ingestor_states``. ``--sensors`` sensors with four string attributes each change state
``--changes`` times (numbers, a slow random walk), through HA's REST API. Then the ingestor (MQTT
source only) stores ``--messages`` zigbee2mqtt-style JSON messages in ``ingestor_mqtt``. Once
every point is in, the servers stop writing, InfluxDB snapshots its cache to TSM files and
compacts them, and the TSM bytes of each database are divided by the number of changes or
messages. The ratio (ingestor / integration) is what to compare: absolute figures depend on the
timestamps (HA's clock while the run lasts).

HA's integration needs the ``influxdb`` and ``influxdb-client`` packages, which the test
harness's Home Assistant does not have: they are installed (with pip ``--target``, no
dependencies) into the run's temporary directory and handed to ``hass`` on ``PYTHONPATH``.
The Home Assistant comes from ``tests.support.homeassistant``; any release it runs works the
same way, as long as its ``hass`` runs on a Python whose pip is next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support import homeassistant as harness
from tests.support.mqtt_publisher import Message, Publisher
from tests.support.servers import InfluxDB1, Mosquitto, free_port

INTEGRATION_DB = "ha_integration"
STATES_DB = "ingestor_states"
MQTT_DB = "ingestor_mqtt"
#: What HA 2024.3.3's influxdb integration requires (its manifest), without dependencies:
#: those it shares with Home Assistant are already installed.
INTEGRATION_PACKAGES = ["influxdb==5.3.1", "influxdb-client==1.24.0", "rx==3.2.0", "msgpack==1.0.8"]


class ColdSnapshotInfluxDB1(InfluxDB1):
    """InfluxDB 1.x that writes its cache to TSM after 1 s without writes and fully compacts
    after 2 s, so that what is measured is what stays on disk."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        text = self.config_path.read_text().replace(
            "[data]\n",
            '[data]\n  cache-snapshot-write-cold-duration = "1s"\n'
            '  compact-full-write-cold-duration = "2s"\n',
        )
        self.config_path.write_text(text)

    def tsm_bytes(self, database: str) -> int:
        return sum(p.stat().st_size for p in (self.directory / "data" / database).rglob("*.tsm"))

    def wal_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.directory / "wal").rglob("*.wal"))


class IntegrationHomeAssistant(harness.HomeAssistant):
    """The harness's Home Assistant with its ``influxdb`` integration writing to ``influx``."""

    def __init__(self, directory: Path, influx: InfluxDB1, entity_glob: str) -> None:
        # The release on this machine's Python: its integration packages are handed to it on
        # PYTHONPATH, which the current release's chroot does not pass through.
        super().__init__(directory, harness.OLDEST)
        with (directory / "configuration.yaml").open("a") as config:
            config.write(
                "influxdb:\n"
                f"  host: {influx.host}\n"
                f"  port: {influx.port}\n"
                f"  database: {INTEGRATION_DB}\n"
                "  include:\n"
                f'    entity_globs: ["{entity_glob}"]\n'
            )


def install_integration_packages(target: Path) -> None:
    hass_python = harness.OLDEST.installed.parent / "python"
    subprocess.run(
        [
            str(hass_python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            *INTEGRATION_PACKAGES,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextmanager
def pythonpath(path: Path) -> Iterator[None]:
    """``PYTHONPATH`` for the processes started inside the block (Home Assistant)."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


@contextmanager
def ingestor(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The ingestor with ``env`` (defaults otherwise), ready; stopped with SIGTERM."""
    port = free_port()
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HA_INGESTOR_")},
        "HA_INGESTOR_HTTP_HOST": "127.0.0.1",
        "HA_INGESTOR_HTTP_PORT": str(port),
        "HA_INGESTOR_LOG_LEVEL": "WARNING",
        **env,
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ha_ingestor", "run"], env=full, stdout=out, stderr=out
        )
    try:
        wait(lambda: _ready(port), 60, "ingestor ready")
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def count(influx: InfluxDB1, database: str, query: str) -> int:
    try:
        series = influx.query(query, database)
    except RuntimeError:
        return 0
    return sum(int(v) for s in series for row in s["values"] for v in row[1:] if v)


def change_states(ha: harness.HomeAssistant, sensors: int, changes: int) -> int:
    """``changes`` numeric state changes per sensor, each with four string attributes."""

    def one_sensor(index: int) -> None:
        rng = random.Random(index)
        attributes = {
            "friendly_name": f"Cost sensor {index}",
            "unit_of_measurement": "°C",
            "device_class": "temperature",
            "icon": "mdi:thermometer",
        }
        level = rng.uniform(15, 25)
        previous = ""
        for _ in range(changes):
            while (text := f"{level:.1f}") == previous:  # every call a real state change
                level += rng.choice((-0.1, 0.1))
            ha.set_state(f"sensor.cost_{index}", text, attributes)
            previous = text
            level += rng.uniform(-0.3, 0.3)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one_sensor, range(sensors)))
    return sensors * changes


def zigbee_messages(count_: int) -> list[Message]:
    rng = random.Random(11)
    messages = []
    for i in range(count_):
        device = i % 30
        payload = {
            "battery": 100 - i // 300,
            "humidity": round(rng.uniform(40, 60), 1),
            "linkquality": rng.randint(60, 200),
            "temperature": round(20 + rng.uniform(-2, 2), 1),
            "voltage": 3000 - i // 100,
        }
        messages.append(Message(f"zigbee2mqtt/sensor_{device}", json.dumps(payload).encode(), 1))
    return messages


def settle(influx: ColdSnapshotInfluxDB1, databases: list[str]) -> dict[str, int]:
    """TSM bytes per database once the WAL is snapshotted and sizes stay put for 6 s."""
    last: dict[str, int] = {}
    stable_since = time.monotonic()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        sizes = {db: influx.tsm_bytes(db) for db in databases}
        if sizes != last or influx.wal_bytes() > 0:
            last, stable_since = sizes, time.monotonic()
        elif time.monotonic() - stable_since > 6 and all(sizes.values()):
            return sizes
        time.sleep(0.5)
    raise TimeoutError(f"TSM files did not settle: {last}")


def field_counts(influx: InfluxDB1, database: str) -> dict[str, int]:
    """Values stored per ``measurement.field`` (what the bytes are made of)."""
    counts: dict[str, int] = {}
    for series in influx.query("SHOW MEASUREMENTS", database):
        for (measurement,) in series["values"]:
            for row in influx.query(f'SELECT count(*) FROM "{measurement}"', database):
                for column, value in zip(row["columns"], row["values"][0], strict=True):
                    if column != "time" and value:
                        counts[f"{measurement}.{column.removeprefix('count_')}"] = int(value)
    return counts


@dataclass
class Result:
    state_changes: int
    messages: int
    integration_bytes: int
    ingestor_state_bytes: int
    ingestor_mqtt_bytes: int
    integration_fields: dict[str, int]
    ingestor_state_fields: dict[str, int]

    def report(self) -> str:
        per_change_theirs = self.integration_bytes / self.state_changes
        per_change_ours = self.ingestor_state_bytes / self.state_changes
        per_message = self.ingestor_mqtt_bytes / self.messages
        return "\n".join(
            [
                f"state changes: {self.state_changes}, MQTT messages: {self.messages}",
                "| what | TSM bytes | bytes per item |",
                "|---|---|---|",
                f"| HA influxdb integration, states | {self.integration_bytes} | "
                f"{per_change_theirs:.1f} |",
                f"| HA Ingestor ha_state (+ ha_event) | {self.ingestor_state_bytes} | "
                f"{per_change_ours:.1f} |",
                f"| HA Ingestor mqtt_message | {self.ingestor_mqtt_bytes} | {per_message:.1f} |",
                f"ratio ingestor / integration per state change: "
                f"{per_change_ours / per_change_theirs:.2f}",
                f"values stored by the integration: {self.integration_fields}",
                f"values stored by the ingestor: {self.ingestor_state_fields}",
                json.dumps(self.__dict__),
            ]
        )


def run(sensors: int, changes: int, messages: int) -> Result:
    with tempfile.TemporaryDirectory(prefix="ha-ingestor-storage-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        influx = ColdSnapshotInfluxDB1(workdir / "influxdb")
        influx.start()
        stack.callback(influx.stop)
        mosquitto = Mosquitto(workdir / "mosquitto")
        mosquitto.start()
        stack.callback(mosquitto.stop)
        install_integration_packages(workdir / "ha-packages")
        influx.create_database(INTEGRATION_DB)
        ha = IntegrationHomeAssistant(workdir / "ha", influx, "sensor.cost_*")
        with pythonpath(workdir / "ha-packages"):
            ha.start()
        stack.callback(ha.stop)
        log = workdir / "ingestor.log"
        states_env = {
            "HA_INGESTOR_HA_URL": ha.url,
            "HA_INGESTOR_HA_TOKEN": ha.token,
            "HA_INGESTOR_INFLUX_URL": influx.url,
            "HA_INGESTOR_INFLUX_DATABASE": STATES_DB,
            "HA_INGESTOR_SPOOL_DIR": str(workdir / "spool-states"),
        }
        with ingestor(states_env, log):
            total = change_states(ha, sensors, changes)
            ours = "SELECT count(state) FROM ha_state WHERE entity_id =~ /^sensor.cost_/"
            theirs = 'SELECT count(value) FROM "°C"'
            wait(lambda: count(influx, STATES_DB, ours) >= total, 120, "ingestor's states")
            wait(lambda: count(influx, INTEGRATION_DB, theirs) >= total, 120, "HA's states")
        mqtt_env = {
            "HA_INGESTOR_MQTT_HOST": mosquitto.host,
            "HA_INGESTOR_MQTT_PORT": str(mosquitto.port),
            "HA_INGESTOR_MQTT_TOPICS": "zigbee2mqtt/#",
            "HA_INGESTOR_INFLUX_URL": influx.url,
            "HA_INGESTOR_INFLUX_DATABASE": MQTT_DB,
            "HA_INGESTOR_SPOOL_DIR": str(workdir / "spool-mqtt"),
        }
        with ingestor(mqtt_env, log):
            batch = zigbee_messages(messages)
            with Publisher(mosquitto.host, mosquitto.port, client_id="storage-cost") as pub:
                pub.publish_many(batch)
            query = "SELECT count(payload) FROM mqtt_message"
            wait(lambda: count(influx, MQTT_DB, query) >= messages, 120, "MQTT messages")
        ha.stop()
        sizes = settle(influx, [INTEGRATION_DB, STATES_DB, MQTT_DB])
        return Result(
            total,
            messages,
            sizes[INTEGRATION_DB],
            sizes[STATES_DB],
            sizes[MQTT_DB],
            field_counts(influx, INTEGRATION_DB),
            field_counts(influx, STATES_DB),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sensors", type=int, default=30)
    parser.add_argument("--changes", type=int, default=100, help="state changes per sensor")
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    print(run(args.sensors, args.changes, args.messages).report())


if __name__ == "__main__":
    main()
