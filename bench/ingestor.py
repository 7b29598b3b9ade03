"""For the benchmarks: the servers, the ingestor as a separate process, and what they read about
processes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.servers import InfluxDB1, Mosquitto, free_port

RECEIVED = 'ha_ingestor_events_received_total{source="mqtt"}'
WRITTEN = 'ha_ingestor_points_written_total{measurement="mqtt_message"}'


@contextmanager
def bench_servers() -> Iterator[tuple[Path, Mosquitto, InfluxDB1]]:
    """A temporary directory with Mosquitto and InfluxDB 1.x running in it."""
    with tempfile.TemporaryDirectory(prefix="ha-ingestor-bench-") as tmp:
        workdir = Path(tmp)
        mosquitto = Mosquitto(workdir / "mosquitto")
        influx = InfluxDB1(workdir / "influxdb")
        mosquitto.start()
        influx.start()
        try:
            yield workdir, mosquitto, influx
        finally:
            mosquitto.stop()
            influx.stop()


def mosquitto_sub(
    mosquitto: Mosquitto, prefix: str, qos: int, client_id: str, count: int | None = None
) -> subprocess.Popen[bytes]:
    """``mosquitto_sub`` (C), the baseline: subscribed to ``prefix/#``, its output discarded;
    with ``count`` it exits after that many messages."""
    command = ["mosquitto_sub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-q", str(qos)]
    command += ["-t", f"{prefix}/#", "-i", client_id]
    if count is not None:
        command += ["-C", str(count)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


@dataclass(frozen=True)
class RunningIngestor:
    process: subprocess.Popen[bytes]
    database: str
    metrics_url: str


@contextmanager
def ingestor_process(
    mosquitto: Mosquitto,
    influx: InfluxDB1,
    prefix: str,
    workdir: Path,
    *,
    spool: bool = True,
    source: Path | None = None,
) -> Iterator[RunningIngestor]:
    """``ha-ingestor run`` subscribed to ``<prefix>/#``, writing to database ``bench_<prefix>``;
    yields once it is ready. ``source``: a ``src`` directory of another version to run instead
    of the installed one. ``BENCH_HA_INGESTOR_*`` variables pass settings through, and
    ``BENCH_PROFILE=/tmp/profile`` writes a cProfile file per run."""
    database = f"bench_{prefix}"
    http_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HA_INGESTOR_")},
        "HA_INGESTOR_MQTT_HOST": mosquitto.host,
        "HA_INGESTOR_MQTT_PORT": str(mosquitto.port),
        "HA_INGESTOR_MQTT_TOPICS": f"{prefix}/#",
        "HA_INGESTOR_MQTT_CLIENT_ID": f"bench-ingestor-{prefix}",
        "HA_INGESTOR_INFLUX_URL": influx.url,
        "HA_INGESTOR_INFLUX_DATABASE": database,
        "HA_INGESTOR_SPOOL_DIR": str(workdir / f"spool-{prefix}"),
        "HA_INGESTOR_SPOOL_ENABLED": "true" if spool else "false",
        "HA_INGESTOR_HTTP_HOST": "127.0.0.1",
        "HA_INGESTOR_HTTP_PORT": str(http_port),
        "HA_INGESTOR_INSTANCE": "bench",
        "HA_INGESTOR_LOG_LEVEL": "WARNING",
        **{
            k.removeprefix("BENCH_"): v
            for k, v in os.environ.items()
            if k.startswith("BENCH_HA_INGESTOR_")
        },
    }
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "ha_ingestor", "run"]
    if os.environ.get("BENCH_PROFILE"):
        profile = f"{os.environ['BENCH_PROFILE']}.{prefix}.prof"
        command = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "ha_ingestor", "run"]
    with (workdir / f"ingestor-{prefix}.log").open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while _status(f"http://127.0.0.1:{http_port}/readyz") != 200:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"ingestor did not become ready; see {log.name}")
                time.sleep(0.1)
            yield RunningIngestor(process, database, f"http://127.0.0.1:{http_port}/metrics")
        finally:
            process.terminate()
            process.wait(30)


def ingestor_counters(metrics_url: str) -> dict[str, int]:
    """The RECEIVED and WRITTEN counters from /metrics (cheap, unlike counting in InfluxDB)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    counters = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in (RECEIVED, WRITTEN):
            counters[name] = int(float(value))
    return counters


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except OSError:
        return 0
