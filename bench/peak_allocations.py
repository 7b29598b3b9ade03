"""``python -m ha_ingestor`` with tracemalloc on: on exit, to stderr, the Python heap at its
peak and the source lines that held most of it then (sampled every 50 ms; a snapshot is taken
whenever the traced size passes the last peak by 1 MB).

    .venv/bin/python -m bench.peak_allocations import --since 9d ...
"""

from __future__ import annotations

import sys
import threading
import tracemalloc

from ha_ingestor.cli import main as ingestor_main

STEP = 1 << 20
TOP = 12


def _watch(snapshots: list[tracemalloc.Snapshot], peak: list[int], done: threading.Event) -> None:
    while not done.wait(0.05):
        current, _ = tracemalloc.get_traced_memory()
        if current > peak[0] + STEP:
            peak[0] = current
            snapshots[:] = [tracemalloc.take_snapshot()]


def main() -> int:
    tracemalloc.start(1)
    baseline = tracemalloc.get_traced_memory()[0]
    snapshots: list[tracemalloc.Snapshot] = []
    peak = [0]
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(snapshots, peak, done), daemon=True)
    watcher.start()
    try:
        return ingestor_main(sys.argv[1:])
    finally:
        done.set()
        watcher.join()
        _, traced_peak = tracemalloc.get_traced_memory()
        print(
            f"tracemalloc: peak {traced_peak / 2**20:.1f} MB (at start {baseline / 2**20:.1f} MB)",
            file=sys.stderr,
        )
        if snapshots:
            for stat in snapshots[0].statistics("lineno")[:TOP]:
                print(f"tracemalloc: {stat}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
