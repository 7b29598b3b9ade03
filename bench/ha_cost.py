"""What the ingestor costs at a steady Home Assistant event rate (a real Home Assistant).

    .venv/bin/python -m bench.ha_cost [--rate 50] [--seconds 20]

Starts Home Assistant (the test release, see tests/support/homeassistant.py), InfluxDB 1.x and
the ingestor with only the Home Assistant source; then changes a state ``--rate`` times a second
through Home Assistant's REST API and reports the ingestor's CPU time over the window as a
percentage of one core, and idle before it. Home Assistant itself does most of the work here:
run it on a quiet machine, or compare runs of one session.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.support.homeassistant import HomeAssistant
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ha-ingestor-bench-") as tmp:
        workdir = Path(tmp)
        with started(InfluxDB1(workdir / "influxdb")) as influx:
            ha = HomeAssistant(workdir / "homeassistant")
            ha.start()
            try:
                measure(ha, influx, workdir, args.rate, args.seconds)
            finally:
                ha.stop()


def measure(
    ha: HomeAssistant, influx: InfluxDB1, workdir: Path, rate: float, seconds: float
) -> None:
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
            began, cpu = time.monotonic(), cpu_seconds(process.pid)
            for index in range(int(rate * seconds)):
                delay = began + index / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                ha.set_state(f"sensor.cost_{index % 20}", str(index), {"unit_of_measurement": "W"})
            remaining = seconds - (time.monotonic() - began)
            if remaining > 0:
                time.sleep(remaining)
            busy = (cpu_seconds(process.pid) - cpu) / (time.monotonic() - began)
            print(
                f"ingestor idle {100 * idle:.2f} % of a core; at {rate:g} state changes/s "
                f"{100 * busy:.2f} % ({1e6 * busy / rate:.0f} µs per event)"
            )
        finally:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
