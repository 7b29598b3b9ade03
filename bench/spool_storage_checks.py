"""What the spool's storage checks cost per group commit, against a whole commit in the same run.

    .venv/bin/python -m bench.spool_storage_checks

Before each commit the spool checks that its file is still the one it opened and that its
directory is writable; after it, it measures the free space on the disk and inside the file.
Prints the time of those checks, of a small commit (with its sync) that includes them, and the
ratio.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from ha_ingestor.pipeline.spool import SqliteSpool
from ha_ingestor.telemetry import Telemetry

ROUNDS = 20_000
COMMITS = 2_000


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ha-ingestor-bench-") as directory:
        async with SqliteSpool(Path(directory), Telemetry()) as spool:
            await asyncio.gather(*(spool.add(f"m v={i}i {i}") for i in range(1000)))
            db = spool._db
            assert db is not None
            began = time.perf_counter()
            for _ in range(ROUNDS):
                spool._check_file()
                spool._measure_space(db)
            checks = (time.perf_counter() - began) / ROUNDS
            began = time.perf_counter()
            for i in range(COMMITS):
                spool._write(None, 0.0, 0, 0, [], {"bench": str(i)})
            commit = (time.perf_counter() - began) / COMMITS
    print(f"storage checks per commit: {checks * 1e6:.1f} µs")
    print(f"one small commit (checks and sync included): {commit * 1e6:.0f} µs")
    print(f"ratio checks / commit: {checks / commit:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
