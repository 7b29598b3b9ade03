"""MQTT → InfluxDB throughput, end to end, against real Mosquitto and InfluxDB 1.x.

    .venv/bin/python -m bench.mqtt_throughput [--messages 200000] [--qos 1] [--runs 3]
                                              [--no-spool-baseline] [--compare REV]

Publishes N messages of realistic shape (zigbee2mqtt-style JSON, plain numbers, text) as fast as
the broker takes them and reports, all measured in the same run on the same machine:

- the rate ``mosquitto_sub`` (C) drains the same messages from the same broker — the baseline,
  measured before, between and after the ingestor runs and averaged;
- the ingestor's end-to-end rate: first publish → every message counted in InfluxDB,
  with the durable spool on (the default) and, for the cost of durability, with it off;
- ratios between them, messages lost, and the ingestor's peak RSS.

Each ingestor run writes to an InfluxDB of its own, started for it: a second run into a database
that already holds the first run's points made influxd work harder (up to 1.5 s more CPU).

``--compare REV`` runs the ``src`` of another commit (``git archive``) as well, alternating with
this tree's spool-on runs, and prints both medians: the ratio to ``mosquitto_sub`` moves with the
machine, two versions measured this way do not. Dependencies that version has and this one lacks
go on ``PYTHONPATH`` (e.g. ``pip install --target /tmp/gmqtt gmqtt==0.8.0`` for d00653e).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.mqtt_publisher import Message, Publisher
from tests.support.servers import InfluxDB1, Mosquitto, started

from bench.ingestor import (
    RECEIVED,
    WRITTEN,
    cpu_seconds,
    ingestor_counters,
    ingestor_process,
    mosquitto_sub,
    peak_rss_mb,
)

ROOT = Path(__file__).resolve().parent.parent


def make_messages(count: int, qos: int, prefix: str) -> list[Message]:
    rng = random.Random(42)
    messages = []
    for i in range(count):
        device = i % 500
        kind = rng.random()
        if kind < 0.6:
            topic = f"{prefix}/zigbee2mqtt/sensor_{device}"
            payload = json.dumps(
                {
                    "battery": rng.randint(1, 100),
                    "humidity": round(rng.uniform(20, 80), 2),
                    "linkquality": rng.randint(0, 255),
                    "temperature": round(rng.uniform(-10, 35), 2),
                    "voltage": rng.randint(2800, 3100),
                    "update": {"state": "idle", "installed_version": 16909577},
                    "seq": i,
                }
            ).encode()
        elif kind < 0.85:
            topic = f"{prefix}/tele/plug_{device}/power"
            payload = f"{rng.uniform(0, 2500):.1f}".encode()
        else:
            topic = f"{prefix}/stat/light_{device}/POWER"
            payload = rng.choice([b"ON", b"OFF", b"offline", b"some status text"])
        messages.append(Message(topic, payload, qos))
    return messages


def publish(mosquitto: Mosquitto, messages: list[Message], client_id: str) -> float:
    started = time.perf_counter()
    with Publisher(mosquitto.host, mosquitto.port, client_id=client_id) as publisher:
        publisher.publish_many(messages)
    return started


def baseline_mosquitto_sub(
    mosquitto: Mosquitto, messages: list[Message], qos: int, prefix: str
) -> tuple[float, float]:
    """Seconds for mosquitto_sub to receive every message, from the first publish, and the
    broker's CPU seconds meanwhile."""
    assert mosquitto.process is not None
    sub = mosquitto_sub(mosquitto, prefix, qos, f"bench-sub-{prefix}", count=len(messages))
    time.sleep(1.0)  # mosquitto_sub has no "subscribed" signal
    broker_cpu = cpu_seconds(mosquitto.process.pid)
    started = publish(mosquitto, messages, f"bench-pub-{prefix}")
    sub.wait(timeout=600)
    seconds = time.perf_counter() - started
    return seconds, cpu_seconds(mosquitto.process.pid) - broker_cpu


@dataclass
class IngestorRun:
    seconds: float
    received_seconds: float  # first publish → every message received by the ingestor
    stored: int
    peak_rss_mb: float
    cpu_seconds: float  # user + system time of the ingestor process from the first publish on
    influxd_cpu_seconds: float  # influxd's CPU time from the first publish to the last count
    mosquitto_cpu_seconds: float


def checkout_source(rev: str, directory: Path) -> Path:
    """The ``src`` directory of commit ``rev``, extracted into ``directory``."""
    directory.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory / "src"


def run_ingestor(
    mosquitto: Mosquitto,
    messages: list[Message],
    prefix: str,
    spool: bool,
    workdir: Path,
    stall_timeout: float,
    source: Path | None = None,
) -> IngestorRun:
    with (
        started(InfluxDB1(workdir / f"influxdb-{prefix}")) as influx,
        ingestor_process(mosquitto, influx, prefix, workdir, spool=spool, source=source) as running,
    ):
        process, database = running.process, running.database
        start_box: list[float] = []
        assert influx.process is not None
        assert mosquitto.process is not None
        influxd_cpu = cpu_seconds(influx.process.pid)
        mosquitto_cpu = cpu_seconds(mosquitto.process.pid)
        startup_cpu = cpu_seconds(process.pid)
        publisher = threading.Thread(
            target=lambda: start_box.append(publish(mosquitto, messages, f"bench-pub-{prefix}"))
        )
        publisher.start()
        metrics_url = running.metrics_url
        # Progress comes from the ingestor's counters: points InfluxDB acknowledged (204). Polling
        # InfluxDB with count() instead would cost influxd ~0.1 s of CPU per query at 300k points
        # and so slow down the very thing measured. The total is then checked in InfluxDB itself.
        written, last_change, last_written = 0, time.monotonic(), -1
        received_at = 0.0
        while written < len(messages):
            time.sleep(0.05)
            counters = ingestor_counters(metrics_url)
            if not received_at and counters.get(RECEIVED, 0) >= len(messages):
                received_at = time.perf_counter()
            written = counters.get(WRITTEN, 0)
            if written != last_written:
                last_written, last_change = written, time.monotonic()
            elif time.monotonic() - last_change > stall_timeout:
                break
        finished = time.perf_counter()
        publisher.join()
        ingestor_cpu = cpu_seconds(process.pid) - startup_cpu
        influxd_cpu = cpu_seconds(influx.process.pid) - influxd_cpu  # before the count() below
        mosquitto_cpu = cpu_seconds(mosquitto.process.pid) - mosquitto_cpu
        stored = influx.count(database, "mqtt_message", "qos")
        received_seconds = (received_at or finished) - start_box[0]
        return IngestorRun(
            finished - start_box[0],
            received_seconds,
            stored,
            peak_rss_mb(process.pid),
            ingestor_cpu,
            influxd_cpu,
            mosquitto_cpu,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1))
    parser.add_argument(
        "--runs", type=int, default=1, help="spool-on runs (the median ratio is printed)"
    )
    parser.add_argument("--no-spool-baseline", action="store_true", help="skip the spool-off run")
    parser.add_argument("--stall-timeout", type=float, default=20.0)
    parser.add_argument(
        "--compare", metavar="REV", help="also run this commit's src, alternating with this tree"
    )
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="ha-ingestor-bench-") as tmp,
        started(Mosquitto(Path(tmp) / "mosquitto")) as mosquitto,
    ):
        workdir = Path(tmp)
        n: int = args.messages
        qos: int = args.qos
        print(
            f"{n} messages, QoS {args.qos}, {os.cpu_count()} CPUs; broker, database and "
            "ingestor on this machine"
        )

        broker_cpu: list[float] = []

        def baseline(prefix: str) -> float:
            messages = make_messages(n, qos, prefix)
            seconds, cpu = baseline_mosquitto_sub(mosquitto, messages, qos, prefix)
            broker_cpu.append(cpu)
            return n / seconds

        # The baseline is measured before, between and after the ingestor runs and averaged:
        # on a noisy machine one measurement of it moves the ratios by ±15 % and more.
        other = checkout_source(args.compare, workdir / "compare") if args.compare else None
        runs: list[tuple[str, bool, str, Path | None]] = []
        for i in range(args.runs):
            number = f" #{i + 1}" if args.runs > 1 else ""
            runs.append((f"spool on (durable, default){number}", True, f"b1{i}", None))
            if other is not None:
                runs.append((f"{args.compare[:12]}, spool on{number}", True, f"c1{i}", other))
        if not args.no_spool_baseline:
            runs.append(("spool off (memory only)", False, "b2", None))
        sub_rates: list[float] = []
        results: list[IngestorRun] = []
        for _, spool, prefix, source in runs:
            sub_rates.append(baseline(f"s{prefix}"))
            results.append(
                run_ingestor(
                    mosquitto,
                    make_messages(n, args.qos, prefix),
                    prefix,
                    spool,
                    workdir,
                    args.stall_timeout,
                    source,
                )
            )
        sub_rates.append(baseline("s-after"))
        sub_rate = sum(sub_rates) / len(sub_rates)
        samples = ", ".join(f"{rate:,.0f}" for rate in sub_rates)
        print(f"mosquitto_sub (C) drain:        {sub_rate:10,.0f} msg/s  (mean of {samples})")
        broker = ", ".join(f"{cpu:.1f}" for cpu in broker_cpu)
        print(f"    mosquitto's CPU meanwhile: {broker} s")
        rates: dict[bool, list[float]] = {True: [], False: []}
        compared: list[float] = []
        for (label, spool, _, source), result in zip(runs, results, strict=True):
            rate = result.stored / result.seconds
            (compared if source is not None else rates[spool]).append(rate)
            print(
                f"ingestor, {label:28s} {rate:10,.0f} msg/s  ({result.seconds:.2f} s)  "
                f"ratio to mosquitto_sub {rate / sub_rate:.2f}  lost {n - result.stored}  "
                f"peak RSS {result.peak_rss_mb:.0f} MB  ingestor CPU {result.cpu_seconds:.1f} s "
                f"({result.cpu_seconds / n * 1e6:.0f} µs/msg)"
            )
            print(
                f"    all received after {result.received_seconds:.2f} s "
                f"(±0.1 s), all stored after {result.seconds:.2f} s; "
                f"CPU meanwhile: influxd {result.influxd_cpu_seconds:.1f} s, "
                f"mosquitto {result.mosquitto_cpu_seconds:.1f} s"
            )
        spool_on = statistics.median(rates[True])
        if len(rates[True]) > 1:
            print(f"median of the spool-on runs: ratio to mosquitto_sub {spool_on / sub_rate:.2f}")
        if compared:
            theirs = statistics.median(compared)
            print(
                f"median of {args.compare}: ratio to mosquitto_sub {theirs / sub_rate:.2f}; "
                f"this tree / {args.compare} = {spool_on / theirs:.2f}"
            )
        if rates[False]:
            print(
                "cost of durability: spool-on rate / spool-off rate = "
                f"{spool_on / statistics.median(rates[False]):.2f}"
            )


if __name__ == "__main__":
    main()
