"""The command line, as users run it."""

from __future__ import annotations

import os
import subprocess
import sys

from ha_ingestor import __version__
from tests.support.servers import InfluxDB1, Mosquitto, free_port


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HA_INGESTOR_")}
    return subprocess.run(
        [sys.executable, "-m", "ha_ingestor", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ha-ingestor {__version__}"


def test_configuration_error_names_the_variable_and_hides_secrets() -> None:
    result = run(
        "run",
        HA_INGESTOR_MQTT_HOST="b",
        HA_INGESTOR_INFLUX_URL="http://x",
        HA_INGESTOR_MQTT_PORT="not-a-port",
        HA_INGESTOR_MQTT_PASSWORD="pw-s3cret",
    )
    assert result.returncode == 2
    assert "HA_INGESTOR_MQTT_PORT" in result.stderr
    assert "pw-s3cret" not in result.stderr + result.stdout


def test_check_reaches_every_endpoint(mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    env = {
        "HA_INGESTOR_MQTT_HOST": mosquitto.host,
        "HA_INGESTOR_MQTT_PORT": str(mosquitto.port),
        "HA_INGESTOR_INFLUX_URL": influxdb.url,
        "HA_INGESTOR_INFLUX_DATABASE": "check_db",
    }
    result = run("check", **env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   mqtt: connected to" in result.stdout
    assert "subscribed to #" in result.stdout
    assert "ok   influxdb: InfluxDB 1.6.7" in result.stdout

    dead = free_port()
    result = run(
        "check",
        **{
            **env,
            "HA_INGESTOR_INFLUX_URL": f"http://127.0.0.1:{dead}",
            "HA_INGESTOR_HA_URL": f"http://127.0.0.1:{dead}",
            "HA_INGESTOR_HA_TOKEN": "t0k",
        },
    )
    assert result.returncode == 1
    assert "ok   mqtt" in result.stdout
    assert "FAIL influxdb" in result.stdout
    assert "FAIL homeassistant" in result.stdout
    assert "t0k" not in result.stdout
