"""What the ingestor costs at the rates homes have: CPU and memory at a steady MQTT rate.

    .venv/bin/python -m bench.mqtt_cost [--rates 10,100,1000] [--seconds 15] [--qos 1]

For the spool on (the default) and off, the ingestor runs as its own process; ``mosquitto_sub``
(C) subscribes to the same topics at the same time as a baseline. A publisher paces
zigbee2mqtt-style JSON messages evenly at each rate; for every window (idle first, then each
rate) the bench reports each subscriber's CPU time over the window as a percentage of one core,
CPU time per message, and the ingestor's resident memory.

CPU is process CPU time (user + system, all threads, from /proc), not wall-clock load, so other
work on the machine inflates it far less than it does rates; it still does through cache and
scheduler effects, so compare the ingestor with mosquitto_sub in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.mqtt_publisher import Message, Publisher
from tests.support.servers import Mosquitto

from bench.ingestor import (
    RECEIVED,
    bench_servers,
    cpu_seconds,
    ingestor_counters,
    ingestor_process,
    mosquitto_sub,
    peak_rss_mb,
)


def zigbee_messages(count: int, qos: int, prefix: str, seed: int) -> list[Message]:
    rng = random.Random(seed)
    return [
        Message(
            f"{prefix}/zigbee2mqtt/sensor_{i % 50}",
            json.dumps(
                {
                    "battery": rng.randint(1, 100),
                    "humidity": round(rng.uniform(20, 80), 2),
                    "linkquality": rng.randint(0, 255),
                    "temperature": round(rng.uniform(-10, 35), 2),
                    "voltage": rng.randint(2800, 3100),
                    "update": {"state": "idle", "installed_version": 16909577},
                }
            ).encode(),
            qos,
        )
        for i in range(count)
    ]


def publish_paced(mosquitto: Mosquitto, messages: list[Message], rate: float) -> None:
    """One message every 1/rate seconds, as sensors report, not in bursts."""
    with Publisher(mosquitto.host, mosquitto.port, client_id=f"cost-pub-{time.time_ns()}") as pub:
        started = time.monotonic()
        for index, message in enumerate(messages):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pub.publish_many([message])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def subscribed_baseline(mosquitto: Mosquitto, prefix: str, qos: int) -> Iterator[int]:
    process = mosquitto_sub(mosquitto, prefix, qos, f"cost-sub-{prefix}")
    try:
        yield process.pid
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class Window:
    rate: int  # 0 = idle
    ingestor_cpu: float  # seconds of CPU time within the window
    sub_cpu: float
    seconds: float
    received: int
    rss_mb: float

    def percent(self, cpu: float) -> float:
        return 100 * cpu / self.seconds


def measure(
    mosquitto: Mosquitto,
    prefix: str,
    pids: tuple[int, int],
    metrics_url: str,
    rate: int,
    window_seconds: float,
    qos: int,
) -> Window:
    """One window: ``rate`` messages per second (0: idle) for ``window_seconds``."""
    ingestor_pid, sub_pid = pids
    messages = zigbee_messages(int(rate * window_seconds), qos, prefix, seed=rate)
    before = ingestor_counters(metrics_url).get(RECEIVED, 0)
    began = time.monotonic()
    ingestor_before, sub_before = cpu_seconds(ingestor_pid), cpu_seconds(sub_pid)
    if rate:
        publisher = threading.Thread(target=publish_paced, args=(mosquitto, messages, rate))
        publisher.start()
        publisher.join()
    remaining = window_seconds - (time.monotonic() - began)
    if remaining > 0:
        time.sleep(remaining)
    seconds = time.monotonic() - began
    window = Window(
        rate,
        cpu_seconds(ingestor_pid) - ingestor_before,
        cpu_seconds(sub_pid) - sub_before,
        seconds,
        0,
        rss_mb(ingestor_pid),
    )
    time.sleep(1.5)  # the received counter is published every 0.1 s; writes within a second
    window.received = ingestor_counters(metrics_url).get(RECEIVED, 0) - before
    return window


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="10,100,1000")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--spool", choices=("both", "on", "off"), default="both")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    spools = {"both": [True, False], "on": [True], "off": [False]}[args.spool]
    print(
        f"QoS {args.qos}, {args.seconds:.0f} s per window, {os.cpu_count()} CPUs, broker, "
        "database and subscribers on this machine; CPU = process CPU time / window"
    )
    with bench_servers() as (workdir, mosquitto, influx):
        for spool in spools:
            prefix = "on" if spool else "off"
            with (
                ingestor_process(mosquitto, influx, prefix, workdir, spool=spool) as running,
                subscribed_baseline(mosquitto, prefix, args.qos) as sub_pid,
            ):
                pid = running.process.pid
                time.sleep(2.0)  # start-up work (imports, first writes) settles
                label = "spool on (default)" if spool else "spool off"
                print(f"\n{label}")
                print(
                    f"{'rate':>10} {'ingestor CPU':>13} {'per msg':>9} {'RSS':>7} "
                    f"{'mosquitto_sub CPU':>18} {'ratio':>6} {'received':>9}"
                )
                for rate in [0, *rates]:
                    w = measure(
                        mosquitto,
                        prefix,
                        (pid, sub_pid),
                        running.metrics_url,
                        rate,
                        args.seconds,
                        args.qos,
                    )
                    per_message = (
                        f"{1e6 * w.ingestor_cpu / w.received:7.0f}µs" if w.received else "      -"
                    )
                    ratio = w.ingestor_cpu / w.sub_cpu if w.sub_cpu else float("nan")
                    print(
                        f"{(f'{rate} msg/s' if rate else 'idle'):>10} "
                        f"{w.percent(w.ingestor_cpu):11.2f} % {per_message:>9} "
                        f"{w.rss_mb:5.0f}MB {w.percent(w.sub_cpu):16.2f} % {ratio:6.1f} "
                        f"{w.received:>9}"
                    )
                print(f"peak RSS {peak_rss_mb(pid):.0f} MB")


if __name__ == "__main__":
    main()
