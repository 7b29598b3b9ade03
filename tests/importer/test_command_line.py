"""``ha-ingestor import`` as users type it: what it refuses before connecting anywhere."""

from __future__ import annotations

import os
import subprocess
import sys


def _import(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HA_INGESTOR_")}
    return subprocess.run(
        [sys.executable, "-m", "ha_ingestor", "import", *args],
        env={**clean, "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:9", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_the_options() -> None:
    result = _import("--help")
    assert result.returncode == 0
    for option in (
        "--since",
        "--until",
        "--entities",
        "--no-states",
        "--no-statistics",
        "--dry-run",
    ):
        assert option in result.stdout


def test_since_is_required() -> None:
    result = _import()
    assert result.returncode == 2
    assert "--since" in result.stderr


def test_home_assistant_must_be_configured() -> None:
    result = _import("--since", "1d")
    assert result.returncode == 2
    assert "HA_INGESTOR_HA_URL" in result.stderr
    mqtt_only = _import("--since", "1d", HA_INGESTOR_MQTT_HOST="127.0.0.1")
    assert mqtt_only.returncode == 2
    assert "HA_INGESTOR_HA_URL and HA_INGESTOR_HA_TOKEN must both be set" in mqtt_only.stderr


def test_a_bad_option_is_named_before_connecting() -> None:
    result = _import(
        "--since",
        "30x",
        HA_INGESTOR_HA_URL="http://127.0.0.1:9",
        HA_INGESTOR_HA_TOKEN="t",
    )
    assert result.returncode == 2
    assert "ha-ingestor import: --since: '30x' is neither an ISO 8601 time" in result.stderr
