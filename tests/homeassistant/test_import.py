"""``ha-ingestor import`` against the real Home Assistant and the real InfluxDB 1.x: what it
stores equals the recorder's states and statistics, reruns change nothing, a killed import
resumes, an import beside a live service leaves no hole and no duplicate, bad input stops it."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ha_ingestor.importer.job import ACTIVE_KEY, checkpoint_key
from ha_ingestor.pipeline.spool import IMPORT_SPOOL, read_checkpoint
from ha_ingestor.sources.homeassistant import CHECKPOINT_KEY, FIRST_BACKFILL_NS
from tests.homeassistant.harness import running_source
from tests.homeassistant.recorder import (
    ha_version,
    hour_start,
    import_env,
    import_statistics,
    recorded_states,
    recorded_statistics,
    run_import,
    start_import,
    statistics_metadata,
    stored_states,
    stored_statistics,
)
from tests.support.homeassistant import HomeAssistant
from tests.support.ingestor import ingestor_process
from tests.support.recorder_db import connect, insert_statistics, statistic_metadata_id
from tests.support.servers import InfluxDB1, free_port
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.homeassistant, pytest.mark.timeout(300)]

_ids = itertools.count()
HOURS = 48
SHORT_TERM = 24  # 5-minute rows per statistic


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _set_states(ha: HomeAssistant, prefix: str, changes: int, entities: int = 3) -> int:
    for i in range(changes):
        for e in range(entities):
            ha.set_state(
                f"sensor.{prefix}_{e}",
                str(round(20 + i * 0.37 + e, 2)) if e != 2 else ("on" if i % 2 else "off"),
                {"unit_of_measurement": "°C", "device_class": "temperature", "step": i}
                if e != 2
                else {"friendly_name": f"Switch {prefix}"},
            )
    return changes * entities


async def _seed_statistics(ha: HomeAssistant, tag: str) -> list[str]:
    """48 back-dated hours of a meter (state/sum, kWh) and an external measurement
    (mean/min/max, °C); returns their statistic ids once the recorder holds every row."""
    version = ha_version(ha)
    first = hour_start(time.time()) - timedelta(hours=HOURS + 2)
    meter, outdoor = f"sensor.{tag}_energy", f"{tag}:outdoor"
    await import_statistics(
        ha,
        statistics_metadata(
            version,
            statistic_id=meter,
            source="recorder",
            unit="kWh",
            unit_class="energy",
            has_mean=False,
            has_sum=True,
        ),
        [
            {"start": (first + timedelta(hours=h)).isoformat(), "state": h * 1.25, "sum": h * 1.5}
            for h in range(HOURS)
        ],
    )
    await import_statistics(
        ha,
        statistics_metadata(
            version,
            statistic_id=outdoor,
            source=tag,
            unit="°C",
            unit_class="temperature",
            has_mean=True,
            has_sum=False,
        ),
        [
            {
                "start": (first + timedelta(hours=h)).isoformat(),
                "mean": 10 + h / 3,
                "min": 5 + h / 7,
                "max": 15.5 + h,
            }
            for h in range(HOURS)
        ],
    )
    ids = [meter, outdoor]
    await wait_for(
        lambda: len(recorded_statistics(ha, ids)) == 2 * HOURS,
        timeout=60,
        interval=0.2,
        message="imported statistics in the recorder",
    )
    await asyncio.to_thread(_seed_short_term, ha, meter, outdoor, first)
    return ids


def _seed_short_term(ha: HomeAssistant, meter: str, outdoor: str, first: datetime) -> None:
    """5-minute rows of both statistics, a day back. Home Assistant has no API that writes
    them (``import_statistics`` writes hourly rows only), so they go straight into its
    database; it compiles neither statistic itself (no entity has a ``state_class``), so
    nothing else writes theirs."""
    start = (first + timedelta(hours=HOURS // 2)).timestamp()
    starts = [start + m * 300 for m in range(SHORT_TERM)]
    with connect(ha.db_path) as db, db:
        insert_statistics(
            db,
            "statistics_short_term",
            statistic_metadata_id(db, meter),
            [{"start_ts": t, "state": m * 0.1, "sum": 100 + m * 0.2} for m, t in enumerate(starts)],
        )
        insert_statistics(
            db,
            "statistics_short_term",
            statistic_metadata_id(db, outdoor),
            [
                {"start_ts": t, "mean": 12 + m / 8, "min": 11 + m / 9, "max": 13.25 + m}
                for m, t in enumerate(starts)
            ],
        )


def _assert_statistics_match(
    ha: HomeAssistant, influxdb: InfluxDB1, database: str, statistic_ids: list[str]
) -> None:
    """Both periods: every row of the recorder's table stored once, with equal values."""
    for period, table, rows in (
        ("hour", "statistics", HOURS),
        ("5minute", "statistics_short_term", SHORT_TERM),
    ):
        recorded = recorded_statistics(ha, statistic_ids, table)
        assert len(recorded) == len(statistic_ids) * rows, table
        assert stored_statistics(influxdb, database, statistic_ids, period) == recorded, period


def _all_state_rows(influxdb: InfluxDB1, database: str, prefix: str) -> list[dict[str, Any]]:
    rows = influxdb.rows(
        f"SELECT * FROM ha_state WHERE entity_id =~ /^sensor\\.{prefix}_/ GROUP BY *", database
    )
    return sorted(rows, key=lambda r: (r["entity_id"], r["time"]))


def _assert_states_match(
    ha: HomeAssistant, influxdb: InfluxDB1, database: str, prefix: str
) -> None:
    recorded = recorded_states(ha, f"sensor.{prefix}_")
    stored = stored_states(influxdb, database, f"sensor.{prefix}_")
    assert recorded
    assert len(stored) == len({(e, t) for e, t, _ in stored}), "a state stored twice"
    assert {(e, t): s for e, t, s in stored} == recorded


async def test_import_equals_the_recorder_and_a_rerun_changes_nothing(
    home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    ha = home_assistant
    tag = f"imp{next(_ids)}"
    since = datetime.now(UTC) - timedelta(hours=HOURS + 6)
    statistic_ids = await _seed_statistics(ha, tag)
    # A live source sees the same changes: the imported points must be the live ones.
    async with running_source(ha) as live:
        await live.wait_connected()
        seeded = await asyncio.to_thread(_set_states, ha, tag, 25)
        ha.remove_state(f"sensor.{tag}_1")
        ha.set_state(f"sensor.{tag}_1", "21.5", {"unit_of_measurement": "°C"})
        await wait_for(
            lambda: len(recorded_states(ha, f"sensor.{tag}_")) >= seeded + 2,
            timeout=60,
            message="recorder holds the seeded states",
        )
        await wait_for(
            lambda: (
                len([s for s in live.states() if s.tags["entity_id"].startswith(f"sensor.{tag}_")])
                >= seeded + 2
            ),
            timeout=30,
            message="live source saw the seeded states",
        )
        live_points = [s for s in live.states() if s.tags["entity_id"].startswith(f"sensor.{tag}_")]
    env = import_env(ha, influxdb, influx_db, str(tmp_path / "spool"))
    args = ("--since", _iso(since), "--entities", f"sensor.{tag}_*,{tag}:*")

    first = await asyncio.to_thread(run_import, env, *args)
    assert first.returncode == 0, first.stderr
    assert f"imported {seeded + 2} states of 3 entities" in first.stdout
    assert f"{2 * (HOURS + SHORT_TERM)} statistics rows of 2 statistics" in first.stdout

    _assert_states_match(ha, influxdb, influx_db, tag)
    stored = {
        (r["entity_id"], int(r["time"])): r for r in _all_state_rows(influxdb, influx_db, tag)
    }
    for point in live_points:
        row = stored[(point.tags["entity_id"], point.time_ns)]
        for name, value in point.tags.items():
            assert row.get(name) == value, (name, point)
        for name in ("state", "value", "previous_state", "last_changed", "removed"):
            assert row.get(name) == point.fields.get(name), (name, point)
    _assert_statistics_match(ha, influxdb, influx_db, statistic_ids)
    meter = stored_statistics(influxdb, influx_db, statistic_ids[:1], "hour")
    assert {tuple(sorted(v)) for v in meter.values()} == {("state", "sum")}
    tags = influxdb.rows(
        f"SELECT last(mean) FROM ha_statistics WHERE statistic_id = '{tag}:outdoor' GROUP BY *",
        influx_db,
    )
    assert sorted(row["period"] for row in tags) == ["5minute", "hour"]
    for row in tags:
        assert (row["source"], row["unit"], row["instance"]) == (tag, "°C", "Test Home")

    before_states = _all_state_rows(influxdb, influx_db, tag)
    before_statistics = {
        period: stored_statistics(influxdb, influx_db, statistic_ids, period)
        for period in ("hour", "5minute")
    }
    second = await asyncio.to_thread(run_import, env, *args)
    assert second.returncode == 0, second.stderr
    assert "resumed" not in second.stdout  # a finished import is imported again, whole
    assert f"imported {seeded + 2} states" in second.stdout
    assert _all_state_rows(influxdb, influx_db, tag) == before_states
    assert {
        period: stored_statistics(influxdb, influx_db, statistic_ids, period)
        for period in before_statistics
    } == before_statistics


async def test_dry_run_counts_per_entity_and_writes_nothing(
    home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    ha = home_assistant
    tag = f"imp{next(_ids)}"
    seeded = await asyncio.to_thread(_set_states, ha, tag, 4)
    await wait_for(lambda: len(recorded_states(ha, f"sensor.{tag}_")) >= seeded, timeout=60)
    env = import_env(ha, influxdb, influx_db, str(tmp_path / "spool"))
    result = await asyncio.to_thread(
        run_import, env, "--since", "1h", "--entities", f"sensor.{tag}_*", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    for e in range(3):
        assert f"         4  sensor.{tag}_{e}" in result.stdout
    assert f"would import {seeded} states of 3 entities" in result.stdout
    assert stored_states(influxdb, influx_db, f"sensor.{tag}_") == []


async def test_killed_import_resumes_and_completes_without_duplicates(
    home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    """SIGKILL once the states are imported and the statistics under way; the rerun resumes
    the unfinished phases and the result equals the recorder."""
    ha = home_assistant
    tag = f"imp{next(_ids)}"
    statistic_ids = await _seed_statistics(ha, tag)
    seeded = await asyncio.to_thread(_set_states, ha, tag, 30)
    await wait_for(lambda: len(recorded_states(ha, f"sensor.{tag}_")) >= seeded, timeout=60)
    spool = tmp_path / "spool"
    env = import_env(ha, influxdb, influx_db, str(spool))
    # A long span: thousands of (mostly empty) windows, so the kill lands mid-way.
    since = datetime.now(UTC) - timedelta(days=3000)
    args = ("--since", _iso(since), "--entities", f"sensor.{tag}_*,{tag}:*")
    process = start_import(env, *args)
    try:

        def states_done() -> bool:
            value = read_checkpoint(spool / IMPORT_SPOOL, checkpoint_key("states"))
            hour = read_checkpoint(spool / IMPORT_SPOOL, checkpoint_key("statistics.hour"))
            return bool(value) and bool(hour) and process.poll() is None

        await wait_for(states_done, timeout=120, interval=0.01, message="import halfway")
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert read_checkpoint(spool / IMPORT_SPOOL, ACTIVE_KEY), "the import had not finished"

    rerun = await asyncio.to_thread(run_import, env, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed: states, statistics.hour" in rerun.stdout
    assert read_checkpoint(spool / IMPORT_SPOOL, ACTIVE_KEY) == ""
    _assert_states_match(ha, influxdb, influx_db, tag)
    _assert_statistics_match(ha, influxdb, influx_db, statistic_ids)


async def test_import_beside_a_live_service_stores_every_state_once(
    home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    """States before the service started come only from the import, states after its
    checkpoint only from the service; each appears exactly once."""
    ha = home_assistant
    tag = f"imp{next(_ids)}"
    since = datetime.now(UTC) - timedelta(minutes=10)
    before = await asyncio.to_thread(_set_states, ha, tag, 10)
    await wait_for(lambda: len(recorded_states(ha, f"sensor.{tag}_")) >= before, timeout=60)
    # The service back-fills the few seconds before its first subscription itself: wait until
    # these states are older than that, so that only the import can store them.
    await asyncio.sleep(FIRST_BACKFILL_NS / 1e9 + 0.5)
    spool = tmp_path / "spool"
    env = import_env(ha, influxdb, influx_db, str(spool))
    service_env = {
        **env,
        "HA_INGESTOR_HA_INCLUDE_ENTITIES": f"sensor.{tag}_*",
        "HA_INGESTOR_HTTP_HOST": "127.0.0.1",
    }
    stop = threading.Event()
    produced = [before]

    def produce() -> None:
        i = 0
        while not stop.is_set():
            ha.set_state(f"sensor.{tag}_live", str(i), {"n": i})
            produced[0] += 1
            i += 1
            time.sleep(0.01)

    with ingestor_process(service_env, tmp_path / "service.log") as service:
        await service.wait_ready(timeout=60)
        producer = threading.Thread(target=produce, name="state-producer")
        producer.start()
        try:
            await wait_for(
                lambda: read_checkpoint(spool, CHECKPOINT_KEY) is not None,
                timeout=30,
                message="service checkpoint",
            )
            result = await asyncio.to_thread(
                run_import, env, "--since", _iso(since), "--entities", f"sensor.{tag}_*"
            )
            assert result.returncode == 0, result.stderr
            assert "states up to" in result.stdout
            await asyncio.sleep(1.0)  # keep changing states after the cut-over
        finally:
            stop.set()
            producer.join(10)
        await wait_for(
            lambda: len(recorded_states(ha, f"sensor.{tag}_")) >= produced[0],
            timeout=60,
            message="recorder holds every change",
        )
        await wait_for(
            lambda: len(stored_states(influxdb, influx_db, f"sensor.{tag}_")) >= produced[0],
            timeout=60,
            message="every change stored",
        )
        await service.stop(signal.SIGTERM, 30)
    _assert_states_match(ha, influxdb, influx_db, tag)
    cut = datetime.fromisoformat(result.stdout.split("states up to ")[1].split(";")[0].strip())
    stored = stored_states(influxdb, influx_db, f"sensor.{tag}_")
    assert any(t > cut.timestamp() * 1e6 for _, t, _ in stored), "nothing after the cut-over"
    assert any(t < cut.timestamp() * 1e6 for _, t, _ in stored), "nothing before the cut-over"


async def test_influxdb_down_leaves_the_import_durable_and_the_next_one_writes_it(
    home_assistant: HomeAssistant, fresh_influxdb: InfluxDB1, tmp_path: Path
) -> None:
    ha = home_assistant
    tag = f"imp{next(_ids)}"
    seeded = await asyncio.to_thread(_set_states, ha, tag, 5)
    await wait_for(lambda: len(recorded_states(ha, f"sensor.{tag}_")) >= seeded, timeout=60)
    env = import_env(ha, fresh_influxdb, "down_db", str(tmp_path / "spool"))
    env["HA_INGESTOR_SHUTDOWN_TIMEOUT"] = "1"
    fresh_influxdb.stop()
    result = await asyncio.to_thread(
        run_import, env, "--since", "1h", "--entities", f"sensor.{tag}_*", "--no-statistics"
    )
    assert result.returncode == 0, result.stderr  # durable in the import spool
    assert f"imported {seeded} states" in result.stdout
    assert f"{seeded} unwritten (durable in the spool)" in result.stdout
    warning = next(
        line for line in result.stderr.splitlines() if "import not fully written" in line
    )
    assert "influxdb_error=" in warning, warning
    assert "Cannot connect" in warning, "the warning says why InfluxDB took nothing"
    fresh_influxdb.start()
    # Any later import writes what an earlier one left, first.
    again = await asyncio.to_thread(
        run_import, env, "--since", "1m", "--entities", f"sensor.{tag}_*", "--no-statistics"
    )
    assert again.returncode == 0, again.stderr
    assert "0 unwritten" in again.stdout
    _assert_states_match(ha, fresh_influxdb, "down_db", tag)


async def test_lines_influxdb_rejects_are_dead_lettered_and_counted(
    home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    """``state`` stored as a float beforehand: every imported string ``state`` of that shard
    conflicts; the import dead-letters them with InfluxDB's reason and says so."""
    ha = home_assistant
    tag = f"imp{next(_ids)}"
    seeded = await asyncio.to_thread(_set_states, ha, tag, 3, entities=1)
    await wait_for(lambda: len(recorded_states(ha, f"sensor.{tag}_")) >= seeded, timeout=60)
    influxdb.create_database(influx_db)
    influxdb.write(influx_db, f"ha_state,entity_id=other state=1.0 {time.time_ns()}")
    spool = tmp_path / "spool"
    env = import_env(ha, influxdb, influx_db, str(spool))
    result = await asyncio.to_thread(
        run_import, env, "--since", "1h", "--entities", f"sensor.{tag}_*", "--no-statistics"
    )
    assert result.returncode == 0, result.stderr
    assert f"imported {seeded} states" in result.stdout
    assert f"{seeded} dead letters" in result.stdout
    records = [
        json.loads(line)
        for line in (spool / IMPORT_SPOOL / "dead-letter.jsonl").read_text().splitlines()
    ]
    assert len(records) == seeded
    assert all("conflict" in r["reason"] for r in records)
    assert all(
        r["line"].startswith(
            f"ha_state,device_class=temperature,domain=sensor,entity_id=sensor.{tag}_0"
        )
        for r in records
    )


# --- bad input ---------------------------------------------------------------------------------
def _bad(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = run_import(env, *args, timeout=60)
    assert result.returncode != 0
    return result


async def test_unreachable_home_assistant_is_named(
    home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    env = import_env(home_assistant, influxdb, influx_db, str(tmp_path / "spool"))
    env["HA_INGESTOR_HA_URL"] = f"http://127.0.0.1:{free_port()}"
    result = await asyncio.to_thread(_bad, env, "--since", "1d")
    assert "cannot reach Home Assistant at HA_INGESTOR_HA_URL" in result.stderr


async def test_non_admin_token_is_refused(
    home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    token = await home_assistant.create_user(f"importer{next(_ids)}", "a-password-123")
    env = import_env(home_assistant, influxdb, influx_db, str(tmp_path / "spool"), token)
    result = await asyncio.to_thread(_bad, env, "--since", "1d")
    assert "HA_INGESTOR_HA_TOKEN" in result.stderr
    assert "not an administrator" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--since", "2999-01-01T00:00:00+00:00"),
            "--since: '2999-01-01T00:00:00+00:00' is in the future",
        ),
        (("--since", "last tuesday"), "--since: 'last tuesday' is neither an ISO 8601 time"),
        (("--since", "2d", "--until", "3d"), "--until: '3d' is not after --since"),
        (("--since", "1d", "--no-states", "--no-statistics"), "nothing left to import"),
    ],
)
async def test_bad_options_are_named(
    args: tuple[str, ...],
    message: str,
    home_assistant: HomeAssistant,
    influxdb: InfluxDB1,
    influx_db: str,
    tmp_path: Path,
) -> None:
    env = import_env(home_assistant, influxdb, influx_db, str(tmp_path / "spool"))
    result = await asyncio.to_thread(_bad, env, *args)
    assert result.returncode == 2
    assert message in result.stderr


async def test_glob_matching_nothing_is_named(
    home_assistant: HomeAssistant, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    env = import_env(home_assistant, influxdb, influx_db, str(tmp_path / "spool"))
    result = await asyncio.to_thread(
        _bad, env, "--since", "1d", "--entities", "input_boolean.*,sensor.no_such_thing_*"
    )
    assert result.returncode == 2
    assert "--entities: 'sensor.no_such_thing_*' matches no entity" in result.stderr
    assert stored_states(influxdb, influx_db, "input_boolean.") == []
