"""What the ingestor costs at a steady Home Assistant event rate (a real Home Assistant).

    .venv/bin/python -m bench.ha_cost [--rate 50] [--seconds 20] [--runs 3] [--release 2026.11.0]

Starts Home Assistant (the test release, see tests/support/homeassistant.py), InfluxDB 1.x and
the ingestor with only the Home Assistant source; then, ``--runs`` times, changes a state
``--rate`` times a second through Home Assistant's REST API and reports the ingestor's CPU time
over the window as a percentage of one core, and idle before it. Process CPU time, not wall
clock, so other work on the machine moves the figures less. The baseline of each window is
Home Assistant's own CPU time over it (it does the same work whatever the ingestor does): the
ratio ingestor / Home Assistant compares runs made at different times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.support.homeassistant import RELEASES, HomeAssistant
from tests.support.servers import InfluxDB1, free_port, started

from bench.ingestor import cpu_seconds


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--release",
        choices=[release.version for release in RELEASES],
        default=RELEASES[0].version,
        help="the Home Assistant release to run (default: the current one)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ha-ingestor-bench-") as tmp:
        workdir = Path(tmp)
        with started(InfluxDB1(workdir / "influxdb")) as influx:
            release = next(r for r in RELEASES if r.version == args.release)
            ha = HomeAssistant(workdir / "homeassistant", release)
            ha.start()
            try:
                measure(ha, influx, workdir, args.rate, args.seconds, args.runs)
            finally:
                ha.stop()


def measure(
    ha: HomeAssistant, influx: InfluxDB1, workdir: Path, rate: float, seconds: float, runs: int
) -> None:
    assert ha.process is not None
    ha_pid = ha.process.pid  # hass itself: the chroot wrapper execs it
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HA_INGESTOR_")},
        "HA_INGESTOR_HA_URL": ha.url,
        "HA_INGESTOR_HA_TOKEN": ha.token,
        "HA_INGESTOR_INFLUX_URL": influx.url,
        "HA_INGESTOR_SPOOL_DIR": str(workdir / "spool"),
        "HA_INGESTOR_HTTP_HOST": "127.0.0.1",
        "HA_INGESTOR_HTTP_PORT": str(port),
        "HA_INGESTOR_LOG_LEVEL": "WARNING",
    }
    with (workdir / "ingestor.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ha_ingestor", "run"], env=env, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 60
            while not ready(port):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"ingestor did not become ready; see {log.name}")
                time.sleep(0.2)
            time.sleep(5)  # start-up work (registries, first writes) settles
            cpu = cpu_seconds(process.pid)
            time.sleep(10)
            idle = (cpu_seconds(process.pid) - cpu) / 10
            print(
                f"Home Assistant {ha.release.version}; ingestor idle {100 * idle:.2f} % of a core"
            )
            figures = [
                window(ha, ha_pid, process.pid, rate, seconds, run * int(rate * seconds))
                for run in range(runs)
            ]
            busy, ha_busy = (statistics.median(f) for f in zip(*figures, strict=True))
            print(
                f"median of {runs}: ingestor {100 * busy:.2f} % of a core "
                f"({1e6 * busy / rate:.0f} µs per event), Home Assistant {100 * ha_busy:.2f} %, "
                f"ratio {busy / ha_busy:.3f}"
            )
        finally:
            process.terminate()
            process.wait(30)


def window(
    ha: HomeAssistant, ha_pid: int, pid: int, rate: float, seconds: float, first: int
) -> tuple[float, float]:
    """One window of ``rate`` state changes a second: (ingestor, Home Assistant) CPU time over
    it, as fractions of a core."""
    began, cpu, ha_cpu = time.monotonic(), cpu_seconds(pid), cpu_seconds(ha_pid)
    for index in range(int(rate * seconds)):
        delay = began + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        value = str(first + index)
        ha.set_state(f"sensor.cost_{index % 20}", value, {"unit_of_measurement": "W"})
    remaining = seconds - (time.monotonic() - began)
    if remaining > 0:
        time.sleep(remaining)
    elapsed = time.monotonic() - began
    busy = (cpu_seconds(pid) - cpu) / elapsed
    ha_busy = (cpu_seconds(ha_pid) - ha_cpu) / elapsed
    print(
        f"at {rate:g} state changes/s: ingestor {100 * busy:.2f} % of a core "
        f"({1e6 * busy / rate:.0f} µs per event), Home Assistant {100 * ha_busy:.2f} %, "
        f"ratio {busy / ha_busy:.3f}"
    )
    return busy, ha_busy


if __name__ == "__main__":
    main()
