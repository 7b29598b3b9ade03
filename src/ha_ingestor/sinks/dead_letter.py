"""Lines InfluxDB refused for good, and Home Assistant events that could not become a point,
kept with the reason.

``<spool dir>/dead-letter.jsonl``: one JSON object per line, ``{"time", "reason", "line"}`` for a
line (``time`` in ISO 8601 UTC), appended and fsynced before the batch leaves the spool;
``{"time", "reason", "event"}`` for an event, as Home Assistant sent it. At
``max_bytes`` the file is rotated to ``dead-letter.jsonl.1`` (older ones shift to ``.2`` ...);
the oldest beyond ``backups`` is deleted, so the dead letters never fill the disk.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

DEAD_LETTER_FILE = "dead-letter.jsonl"


class DeadLetterFile:
    def __init__(self, path: Path, max_bytes: int = 100 * 1024 * 1024, backups: int = 3) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._lock = asyncio.Lock()  # concurrent write loops append whole records in turn

    async def add(self, lines: list[str], reason: str) -> None:
        """Append one record per line; returns once they are on disk. Raises OSError."""
        now = _now()
        data = b"".join(
            orjson.dumps({"time": now, "reason": reason, "line": line}) + b"\n" for line in lines
        )
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(None, self._append, data)

    async def add_event(self, event: Mapping[str, Any], reason: str) -> None:
        """Append one record of an event that could not be stored. Raises OSError."""
        record = {"time": _now(), "reason": reason, "event": event}
        data = orjson.dumps(record, default=repr) + b"\n"
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(None, self._append, data)

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self._max_bytes:
            self._rotate()
        with self.path.open("ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    def _rotate(self) -> None:
        def backup(n: int) -> Path:
            return self.path.with_name(f"{self.path.name}.{n}")

        backup(self._backups).unlink(missing_ok=True)
        for n in range(self._backups - 1, 0, -1):
            if backup(n).exists():
                backup(n).replace(backup(n + 1))
        if self._backups > 0:
            self.path.replace(backup(1))
        else:
            self.path.unlink()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
