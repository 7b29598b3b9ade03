"""The recorder as ground truth for import tests: seeding back-dated long-term statistics
through ``recorder/import_statistics`` (metadata per Home Assistant release), reading the
recorder's own tables, and running ``ha-ingestor import`` as a child process."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tests.support.homeassistant import HomeAssistant
from tests.support.servers import InfluxDB1

#: mean_type values of Home Assistant's StatisticMeanType.
MEAN_NONE, MEAN_ARITHMETIC = 0, 1


def ha_version(ha: HomeAssistant) -> tuple[int, int]:
    version = str(ha.api("GET", "/api/config")["version"])
    year, month = version.split(".")[:2]
    return int(year), int(month)


def statistics_metadata(
    version: tuple[int, int],
    *,
    statistic_id: str,
    source: str,
    unit: str | None,
    unit_class: str | None,
    has_mean: bool,
    has_sum: bool,
) -> dict[str, Any]:
    """``import_statistics`` metadata as the release wants it: up to 2025.3 ``has_mean``;
    from 2025.4 ``mean_type`` and ``unit_class`` (required by 2026.11), without ``has_mean``."""
    metadata: dict[str, Any] = {
        "has_sum": has_sum,
        "name": None,
        "source": source,
        "statistic_id": statistic_id,
        "unit_of_measurement": unit,
    }
    if version >= (2025, 4):
        metadata["mean_type"] = MEAN_ARITHMETIC if has_mean else MEAN_NONE
        metadata["unit_class"] = unit_class
    else:
        metadata["has_mean"] = has_mean
    return metadata


def hour_start(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(int(epoch_s // 3600 * 3600), UTC)


async def import_statistics(
    ha: HomeAssistant, metadata: Mapping[str, Any], rows: list[dict[str, Any]]
) -> None:
    async with ha.websocket() as ws:
        await ws.call("recorder/import_statistics", metadata=dict(metadata), stats=rows)


def _connect(ha: HomeAssistant) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(f"file:{ha.db_path}?mode=ro", uri=True, timeout=30))


def recorded_statistics(
    ha: HomeAssistant, statistic_ids: list[str], table: str = "statistics"
) -> dict[tuple[str, int], dict[str, float]]:
    """(statistic_id, period start in ns) → the row's non-null values, from ``table``
    (``statistics`` = hour, ``statistics_short_term`` = 5minute)."""
    marks = ",".join("?" * len(statistic_ids))
    with _connect(ha) as db:
        rows = db.execute(
            f"SELECT m.statistic_id, s.start_ts, s.mean, s.min, s.max, s.sum, s.state "
            f"FROM {table} s JOIN statistics_meta m ON s.metadata_id = m.id "
            f"WHERE m.statistic_id IN ({marks})",
            statistic_ids,
        ).fetchall()
    result: dict[tuple[str, int], dict[str, float]] = {}
    for statistic_id, start_ts, *values in rows:
        fields = {
            name: float(value)
            for name, value in zip(("mean", "min", "max", "sum", "state"), values, strict=True)
            if value is not None
        }
        result[(statistic_id, round(start_ts) * 1_000_000_000)] = fields
    return result


def recorded_states(ha: HomeAssistant, entity_prefix: str) -> dict[tuple[str, int], str]:
    """(entity_id, last_updated in µs) → state of every row the recorder holds for entities
    starting with ``entity_prefix``; the float time converted as Home Assistant reads it back
    (``datetime.fromtimestamp``, rounding half to even)."""
    with _connect(ha) as db:
        rows = db.execute(
            "SELECT m.entity_id, s.last_updated_ts, s.state FROM states s "
            "JOIN states_meta m ON s.metadata_id = m.metadata_id "
            "WHERE m.entity_id LIKE ? ESCAPE '\\'",
            (entity_prefix.replace("_", r"\_") + "%",),
        ).fetchall()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    result: dict[tuple[str, int], str] = {}
    for entity_id, ts, state in rows:
        delta = datetime.fromtimestamp(ts, UTC) - epoch
        micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        result[(entity_id, micros)] = state if state is not None else ""
    return result


def stored_states(
    influxdb: InfluxDB1, database: str, entity_prefix: str
) -> list[tuple[str, int, str]]:
    """(entity_id, time in µs, state) of every ``ha_state`` point of those entities."""
    pattern = entity_prefix.replace(".", r"\.")
    try:
        rows = influxdb.rows(
            f"SELECT state FROM ha_state WHERE entity_id =~ /^{pattern}/ GROUP BY entity_id",
            database,
        )
    except RuntimeError:  # no database yet
        return []
    return [(r["entity_id"], int(r["time"]) // 1000, str(r["state"] or "")) for r in rows]


def stored_statistics(
    influxdb: InfluxDB1, database: str, statistic_ids: list[str], period: str
) -> dict[tuple[str, int], dict[str, float]]:
    ids = "|".join(i.replace(".", r"\.") for i in statistic_ids)
    rows = influxdb.rows(
        f"SELECT mean, min, max, sum, state FROM ha_statistics "
        f"WHERE statistic_id =~ /^({ids})$/ AND period = '{period}' GROUP BY *",
        database,
    )
    result: dict[tuple[str, int], dict[str, float]] = {}
    for row in rows:
        key = (row["statistic_id"], int(row["time"]))
        assert key not in result, f"two points for {key}"
        result[key] = {
            name: float(row[name])
            for name in ("mean", "min", "max", "sum", "state")
            if row.get(name) is not None
        }
    return result


def import_env(
    ha: HomeAssistant, influxdb: InfluxDB1, database: str, spool_dir: str, token: str = ""
) -> dict[str, str]:
    return {
        "HA_INGESTOR_HA_URL": ha.url,
        "HA_INGESTOR_HA_TOKEN": token or ha.token,
        "HA_INGESTOR_INFLUX_URL": influxdb.url,
        "HA_INGESTOR_INFLUX_DATABASE": database,
        "HA_INGESTOR_SPOOL_DIR": spool_dir,
        "HA_INGESTOR_LOG_FORMAT": "console",
    }


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HA_INGESTOR_")}


def run_import(
    env: Mapping[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ha_ingestor", "import", *args],
        env={**_clean_environ(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_import(env: Mapping[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ha_ingestor", "import", *args],
        env={**_clean_environ(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
