"""Publish → queryable latency at a steady rate, against real Mosquitto and InfluxDB 1.x.

    .venv/bin/python -m bench.mqtt_latency [--rate 1000] [--seconds 30] [--qos 0]

Publishes zigbee2mqtt-style messages at a fixed rate, each carrying its sequence number. Every
0.1 s a poller asks InfluxDB for the points of the last moments; a message's latency is the time
from its publish to the first answer that contains it, so it includes up to one poll interval.
Prints the 50th, 90th and 99th percentiles, the maximum, and messages lost. With the default
``HA_INGESTOR_INFLUX_FLUSH_INTERVAL`` of 1 s most of the latency is the batch waiting to fill.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from tests.support.mqtt_publisher import Message, Publisher
from tests.support.servers import Mosquitto

from bench.ingestor import bench_servers, ingestor_process

PREFIX = "lat"
_POLL = 0.1
_TICK = 0.01


def publish_steadily(
    mosquitto: Mosquitto, count: int, rate: float, qos: int, published: list[float]
) -> None:
    """Publish ``count`` messages at ``rate`` per second; ``published[i]`` is when i went out."""
    with Publisher(mosquitto.host, mosquitto.port, client_id="bench-latency-pub") as publisher:
        start = time.time()
        sent = 0
        while sent < count:
            due = min(count, int((time.time() - start) * rate) + 1)
            batch = [
                Message(
                    f"{PREFIX}/zigbee2mqtt/sensor_{i % 50}",
                    json.dumps({"seq": i, "temperature": 21.5, "battery": 97}).encode(),
                    qos,
                )
                for i in range(sent, due)
            ]
            publisher.publish_many(batch)
            now = time.time()
            published.extend([now] * len(batch))
            sent = due
            time.sleep(_TICK)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--qos", type=int, default=0, choices=(0, 1))
    args = parser.parse_args()
    count = int(args.rate * args.seconds)

    with (
        bench_servers() as (workdir, mosquitto, influx),
        ingestor_process(mosquitto, influx, PREFIX, workdir) as running,
    ):
        published: list[float] = []
        publisher = threading.Thread(
            target=publish_steadily,
            args=(mosquitto, count, args.rate, args.qos, published),
        )
        publisher.start()
        seen_at: dict[int, float] = {}
        oldest_unseen = 0
        last_new = time.time()
        while len(seen_at) < count and time.time() - last_new < 15:
            time.sleep(_POLL)
            # Points are stamped when received (≈ published): look back from the oldest
            # message not seen yet, with a margin, to keep each answer small.
            while oldest_unseen in seen_at:
                oldest_unseen += 1
            if oldest_unseen >= len(published):
                continue
            since_ns = int((published[oldest_unseen] - 1.0) * 1e9)
            rows = influx.query(
                f'SELECT "seq" FROM "mqtt_message" WHERE time > {since_ns}',
                running.database,
            )
            now = time.time()
            for series in rows:
                for _, seq in series["values"]:
                    if seq is not None and int(seq) not in seen_at:
                        seen_at[int(seq)] = now
                        last_new = now
        publisher.join()

    latencies = [seen_at[i] - published[i] for i in seen_at]
    print(
        f"{count} messages at {args.rate:,.0f} msg/s, QoS {args.qos}; publish → queryable in "
        f"InfluxDB (polled every {_POLL:.1f} s):"
    )
    print(
        f"p50 {percentile(latencies, 0.5):.2f} s  p90 {percentile(latencies, 0.9):.2f} s  "
        f"p99 {percentile(latencies, 0.99):.2f} s  max {max(latencies):.2f} s  "
        f"lost {count - len(seen_at)}"
    )


if __name__ == "__main__":
    main()
