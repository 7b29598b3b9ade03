"""Lines InfluxDB refused for good, kept with the server's reason (JSON lines, fsynced)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import orjson

DEAD_LETTER_FILE = "dead-letter.jsonl"


class DeadLetterFile:
    """Appends ``{"time", "reason", "line"}`` records; rotates once at ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int = 100 * 1024 * 1024) -> None:
        self.path = path
        self._max_bytes = max_bytes

    async def add(self, lines: list[str], reason: str) -> None:
        now = time.time()
        data = b"".join(
            orjson.dumps({"time": now, "reason": reason, "line": line}) + b"\n" for line in lines
        )
        await asyncio.get_running_loop().run_in_executor(None, self._append, data)

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size + len(data) > self._max_bytes:
            self.path.replace(self.path.with_name(self.path.name + ".1"))
        with self.path.open("ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
