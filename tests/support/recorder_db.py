"""Rows written straight into the SQLite database Home Assistant's recorder created (its schema
and migrations are its own), with only the columns that release's schema has: how the history
benchmark seeds more history than the REST API could deliver, and how tests seed what Home
Assistant has no API for (5-minute statistics)."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

#: Length of a row's period per statistics table, in seconds.
STATISTICS_PERIOD_S = {"statistics": 3600, "statistics_short_term": 300}


def connect(db_path: Path) -> closing[sqlite3.Connection]:
    """A writing connection that waits for the recorder's own transactions to finish."""
    return closing(sqlite3.connect(db_path, timeout=30))


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def insert_rows(db: sqlite3.Connection, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows into ``table``, keeping only the columns this schema version has."""
    have = _columns(db, table)
    names = [n for n in rows[0] if n in have]
    marks = ",".join("?" * len(names))
    db.executemany(
        f"INSERT INTO {table} ({','.join(names)}) VALUES ({marks})",
        [tuple(r[n] for n in names) for r in rows],
    )


def statistic_metadata_id(db: sqlite3.Connection, statistic_id: str) -> int:
    row = db.execute(
        "SELECT id FROM statistics_meta WHERE statistic_id = ?", (statistic_id,)
    ).fetchone()
    if row is None:
        raise LookupError(f"no statistics_meta row for {statistic_id!r}")
    return int(row[0])


def insert_statistics(
    db: sqlite3.Connection, table: str, metadata_id: int, rows: Sequence[Mapping[str, Any]]
) -> None:
    """Statistics rows (``start_ts`` and the values: mean, min, max, sum, state) of one statistic
    into ``statistics`` or ``statistics_short_term``, each created when its period ended, as
    the recorder compiles them."""
    period = STATISTICS_PERIOD_S[table]
    insert_rows(
        db,
        table,
        [
            {"created_ts": row["start_ts"] + period, "metadata_id": metadata_id, **row}
            for row in rows
        ],
    )
