"""``ha-ingestor import`` throughput against the real Home Assistant and InfluxDB 1.x.

    .venv/bin/python -m bench.history_import [--entities 100] [--sizes 100,500,1000]
        [--statistics 50] [--days 60]

Seeding. A history of 160,000 state changes cannot come through Home Assistant's REST API in
reasonable time (~550 changes/s here), so the bench lets Home Assistant create its recorder
database (schema and migrations are its own), stops it, and writes rows straight into that
database with the columns the schema has: ``states_meta``/``state_attributes``/``states`` for
sets of 100 sensors with 100, 500 and 1,000 changes each (10k, 50k and 100k state changes),
each set spread over the last 8 days, and ``statistics_meta``/``statistics`` for hourly long-term
statistics (50 x 60 days = 72,000 rows) and 5-minute ones (``statistics_short_term``, 50 x 2 days
= 28,800 rows). Home Assistant is started again and each seeded entity
gets one current state through REST, so that it is known to Home Assistant (the import asks
for the history of the entities Home Assistant knows); a ``recorder_runs`` row from before the
seeded span stands for the recorder having run then (Home Assistant answers a window only if so).

Measured, in the same run:
- the import (a child process, as users run it) of each set: states/s (statistics rows/s),
  wall time to the last point written, and peak RSS (VmHWM) — flat as the history grows
  (10k → 50k → 100k);
- the bound: the same ``history/history_during_period`` and
  ``recorder/statistics_during_period`` requests the import made (read from its debug log),
  replayed by a bare WebSocket client that only waits for each answer — Home Assistant's own
  time to produce them.

``BENCH_PROFILE=/tmp/profile`` writes a cProfile file per import; ``BENCH_TRACEMALLOC=1`` prints
each import's Python heap at its peak and the lines that held it (bench/peak_allocations.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from tests.support.homeassistant import HomeAssistant
from tests.support.recorder_db import connect, insert_rows, insert_statistics, statistic_metadata_id
from tests.support.servers import InfluxDB1

DAY = 86_400.0
SHORT_TERM_DAYS = 2  # 5-minute statistics: 576 rows per statistic


@contextmanager
def servers() -> Iterator[tuple[Path, HomeAssistant, InfluxDB1]]:
    with tempfile.TemporaryDirectory(prefix="ha-ingestor-bench-import-") as tmp:
        workdir = Path(tmp)
        ha = HomeAssistant(workdir / "homeassistant")
        influx = InfluxDB1(workdir / "influxdb")
        influx.start()
        ha.start()
        try:
            yield workdir, ha, influx
        finally:
            ha.stop()
            influx.stop()


def seed_states(db: sqlite3.Connection, prefix: str, entities: int, per_entity: int) -> list[str]:
    now = time.time()
    first = now - 8 * DAY
    step = (now - 60 - first) / per_entity
    names = [f"sensor.{prefix}_{i}" for i in range(entities)]
    for index, entity_id in enumerate(names):
        meta = db.execute("INSERT INTO states_meta (entity_id) VALUES (?)", (entity_id,)).lastrowid
        attrs = orjson.dumps(
            {
                "unit_of_measurement": "W",
                "device_class": "power",
                "state_class": "measurement",
                "friendly_name": f"Bench {prefix} {index}",
            }
        ).decode()
        attributes_id = db.execute(
            "INSERT INTO state_attributes (hash, shared_attrs) VALUES (?, ?)",
            (hash(attrs) & 0x7FFFFFFF, attrs),
        ).lastrowid
        offset = index * step / entities  # entities interleave in time
        insert_rows(
            db,
            "states",
            [
                {
                    "state": f"{(i * 7 + index) % 1000 / 10:.1f}",
                    "last_updated_ts": first + offset + i * step,
                    "last_changed_ts": None,
                    "last_reported_ts": None,
                    "attributes_id": attributes_id,
                    "metadata_id": meta,
                    "origin_idx": 0,
                }
                for i in range(per_entity)
            ],
        )
    return names


def seed_statistics(db: sqlite3.Connection, count: int, days: int) -> list[str]:
    start = (time.time() // 3600 - days * 24) * 3600
    ids = [f"sensor.benchstat_{i}" for i in range(count)]
    for index, statistic_id in enumerate(ids):
        meta = {
            "statistic_id": statistic_id,
            "source": "recorder",
            "unit_of_measurement": "W",
            "has_mean": 1,
            "has_sum": 0,
            "name": None,
            "mean_type": 1,
            "unit_class": "power",
        }
        insert_rows(db, "statistics_meta", [meta])
        metadata_id = statistic_metadata_id(db, statistic_id)
        insert_statistics(
            db,
            "statistics",
            metadata_id,
            [
                {
                    "start_ts": start + h * 3600,
                    "mean": 100.0 + (h + index) % 50,
                    "min": 50.0 + (h + index) % 40,
                    "max": 150.0 + (h + index) % 60,
                }
                for h in range(days * 24)
            ],
        )
        five = (time.time() // 300 - SHORT_TERM_DAYS * 288) * 300
        insert_statistics(
            db,
            "statistics_short_term",
            metadata_id,
            [
                {
                    "start_ts": five + m * 300,
                    "mean": 100.0 + (m + index) % 50,
                    "min": 50.0 + (m + index) % 40,
                    "max": 150.0 + (m + index) % 60,
                }
                for m in range(SHORT_TERM_DAYS * 288)
            ],
        )
    return ids


def seed_recorder_run(db: sqlite3.Connection, days: int) -> None:
    """A recorder run from before the seeded history: Home Assistant answers a history window
    only if the recorder was running by its end (``recorder_runs``)."""
    start = datetime.now(UTC) - timedelta(days=days)
    text = start.strftime("%Y-%m-%d %H:%M:%S.%f")
    insert_rows(
        db,
        "recorder_runs",
        [{"start": text, "end": text, "closed_incorrect": 0, "created": text}],
    )


@dataclass
class ImportRun:
    label: str
    seconds: float
    states: int
    statistics: int
    peak_rss_mb: float
    requests: list[tuple[str, dict[str, Any]]]
    ha_seconds_in_import: float


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_import(
    label: str, ha: HomeAssistant, influx: InfluxDB1, workdir: Path, *args: str
) -> ImportRun:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HA_INGESTOR_")},
        "HA_INGESTOR_HA_URL": ha.url,
        "HA_INGESTOR_HA_TOKEN": ha.token,
        "HA_INGESTOR_INFLUX_URL": influx.url,
        "HA_INGESTOR_INFLUX_DATABASE": f"bench_{label}",
        "HA_INGESTOR_SPOOL_DIR": str(workdir / f"spool-{label}"),
        "HA_INGESTOR_LOG_LEVEL": "DEBUG",
        "HA_INGESTOR_LOG_FORMAT": "json",
    }
    command = [sys.executable, "-m", "ha_ingestor", "import", *args]
    if os.environ.get("BENCH_TRACEMALLOC"):
        command = [sys.executable, "-m", "bench.peak_allocations", *command[3:]]
    elif os.environ.get("BENCH_PROFILE"):
        profile = f"{os.environ['BENCH_PROFILE']}.{label}.prof"
        command = [sys.executable, "-m", "cProfile", "-o", profile, *command[1:]]
    began = time.monotonic()
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0.0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _peak_rss_mb(process.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, name="rss-watch")
    watcher.start()
    stdout, stderr = process.communicate(timeout=1800)
    done.set()
    watcher.join()
    seconds = time.monotonic() - began
    if process.returncode != 0:
        raise RuntimeError(f"import {label} failed ({process.returncode}):\n{stderr[-3000:]}")
    requests: list[tuple[str, dict[str, Any]]] = []
    ha_seconds = 0.0
    for line in stderr.splitlines():
        if line.startswith("tracemalloc: "):
            print(f"{label} {line}")
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        event = record.get("event")
        if event in ("history window", "statistics window"):
            ha_seconds += float(record["seconds"])
            payload = {
                k: v
                for k, v in record.items()
                if k not in ("event", "level", "timestamp", "logger", "rows", "seconds")
            }
            request_type = (
                "history/history_during_period"
                if event == "history window"
                else "recorder/statistics_during_period"
            )
            requests.append((request_type, payload))
    summary = stdout.strip().splitlines()[-1]
    states = int(summary.split("imported ")[1].split(" states")[0])
    statistics = int(summary.split("; ")[1].split(" statistics rows")[0])
    return ImportRun(label, seconds, states, statistics, peak[0], requests, ha_seconds)


async def replay(ha: HomeAssistant, requests: list[tuple[str, dict[str, Any]]]) -> float:
    """Seconds Home Assistant takes to answer ``requests``, one at a time, answers unread."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ha.ws_url, max_msg_size=0) as ws,
    ):
        await ws.receive()
        await ws.send_str(json.dumps({"type": "auth", "access_token": ha.token}))
        await ws.receive()
        began = time.monotonic()
        for message_id, (command, payload) in enumerate(requests, start=1):
            await ws.send_str(json.dumps({"id": message_id, "type": command, **payload}))
            message = await ws.receive()
            if (
                message.type != aiohttp.WSMsgType.TEXT
                or b'"success":true' not in (message.data.encode()[:200])
            ):
                raise RuntimeError(f"replay failed: {str(message.data)[:300]}")
        return time.monotonic() - began


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=100)
    parser.add_argument(
        "--sizes",
        default="100,500,1000",
        help="state changes per entity of each history imported, comma-separated",
    )
    parser.add_argument("--statistics", type=int, default=50)
    parser.add_argument("--days", type=int, default=60)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    with servers() as (workdir, ha, influx):
        ha.stop()
        began = time.monotonic()
        with connect(ha.db_path) as db:
            db.execute("BEGIN")
            seed_recorder_run(db, args.days + 2)
            seeded = [seed_states(db, f"bench{size}", args.entities, size) for size in sizes]
            seed_statistics(db, args.statistics, args.days)
            db.execute("COMMIT")
        seeded_in = time.monotonic() - began
        ha.start()
        for entity_id in (name for names in seeded for name in names):
            ha.set_state(entity_id, "0.0", {"unit_of_measurement": "W", "device_class": "power"})
        hourly = args.statistics * args.days * 24
        short_term = args.statistics * SHORT_TERM_DAYS * 288
        print(
            f"seeded {', '.join(f'{args.entities * size:,}' for size in sizes)} state changes, "
            f"{hourly:,} hourly and {short_term:,} 5-minute statistics rows in {seeded_in:.1f} s"
        )
        runs = [
            run_import(
                f"states{args.entities * size // 1000}k",
                ha,
                influx,
                workdir,
                *("--since", "9d", "--entities", f"sensor.bench{size}_*", "--no-statistics"),
            )
            for size in sizes
        ]
        runs.append(
            run_import(
                "statistics",
                ha,
                influx,
                workdir,
                *("--since", f"{args.days + 1}d", "--entities", "sensor.benchstat_*"),
                "--no-states",
            )
        )
        print(
            f"{'import':<11} {'rows':>8} {'s':>7} {'rows/s':>8} {'HA alone s':>10} "
            f"{'HA rows/s':>9} {'ratio':>6} {'in-import HA s':>14} {'peak RSS MB':>11}"
        )
        for run in runs:
            bound = asyncio.run(replay(ha, run.requests))
            rows = run.states + run.statistics
            print(
                f"{run.label:<11} {rows:>8,} {run.seconds:>7.1f} {rows / run.seconds:>8,.0f} "
                f"{bound:>10.1f} {rows / bound:>9,.0f} {bound / run.seconds:>6.2f} "
                f"{run.ha_seconds_in_import:>14.1f} {run.peak_rss_mb:>11.0f}"
            )
        state_runs = runs[:-1]
        print(
            "peak RSS by history size: "
            + ", ".join(f"{r.states:,} states {r.peak_rss_mb:.0f} MB" for r in state_runs)
            + f" (largest / smallest x{state_runs[-1].peak_rss_mb / max(state_runs[0].peak_rss_mb, 1):.2f})"
        )
        for run in runs:
            measurement = "ha_statistics" if run.label == "statistics" else "ha_state"
            count = influx.count(f"bench_{run.label}", measurement)
            expected = run.states or run.statistics
            print(f"{run.label}: {count:,} points in InfluxDB (expected {expected:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
