"""The ingestor as a child process (``python -m ha_ingestor run``): its environment, a free HTTP
port, its output appended to a log file, readiness and metrics read over HTTP, signals by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import HOST, free_port
from tests.support.waiting import wait_for


class IngestorProcess:
    """Runs of the ingestor with one environment (plus an HTTP port of its own) and one log."""

    def __init__(self, env: Mapping[str, str], log: Path) -> None:
        self.port = free_port()
        self.env = {**env, "HA_INGESTOR_HTTP_PORT": str(self.port)}
        self.log = log
        self.runs: list[subprocess.Popen[bytes]] = []

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The latest run."""
        return self.runs[-1]

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.runs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ha_ingestor", "run"],
                    env={**os.environ, **self.env},
                    stdout=out,
                    stderr=out,
                )
            )

    def _answers(self, path: str) -> bool:
        """Whether ``path`` answers 200."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}{path}", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    async def wait_ready(self, timeout: float = 30, path: str = "/readyz") -> None:
        await wait_for(
            lambda: asyncio.to_thread(self._answers, path),
            timeout=timeout,
            interval=0.1,
            message=f"ingestor answering {path}",
        )

    def mqtt_received(self) -> float:
        """``ha_ingestor_events_received_total{source="mqtt"}`` from /metrics."""
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=2) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "ha_ingestor_events_received_total" and sample.labels == {
                    "source": "mqtt"
                }:
                    return float(sample.value)
        return 0.0

    async def stop(self, sig: signal.Signals, timeout: float) -> int:
        """Send ``sig`` to the latest run; its exit code."""
        self.process.send_signal(sig)
        return await asyncio.to_thread(self.process.wait, timeout)

    def kill_all(self) -> None:
        for process in self.runs:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@contextlib.contextmanager
def ingestor_process(env: Mapping[str, str], log: Path) -> Iterator[IngestorProcess]:
    """The ingestor started (not yet ready); whatever still runs is killed when the block ends."""
    ingestor = IngestorProcess(env, log)
    try:
        ingestor.start()
        yield ingestor
    finally:
        ingestor.kill_all()
