"""Health, readiness, metrics, logs and the status page, against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.service import numbered, run_service, service_env
from tests.support.ingestor import ingestor_process
from tests.support.mqtt_publisher import Message, publish_many
from tests.support.servers import InfluxDB1, Mosquitto, free_port
from tests.support.waiting import wait_for
from tests.web.support import chromium, needs_chromium, read_png

pytestmark = pytest.mark.timeout(180)


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_readyz_follows_the_broker_and_metrics_agree_with_reality(
    tmp_path: Path, fresh_mosquitto: Mosquitto, influxdb: InfluxDB1, influx_db: str
) -> None:
    broker = fresh_mosquitto
    env = service_env(tmp_path, influxdb, influx_db, broker, mqtt_topics="m/#")
    async with run_service(env, influxdb, influx_db) as service:
        await wait_for(lambda: service.service.telemetry.is_connected("mqtt"), timeout=30)
        assert (await service.get("/readyz"))[0] == 200
        count = 1234
        await publish_many(broker.host, broker.port, numbered("m", 0, count))
        await wait_for(lambda: service.count("mqtt_message") == count, timeout=60)

        status, text = await service.get("/metrics")
        assert status == 200
        values = metric_values(text)
        assert values[("ha_ingestor_events_received_total", (("source", "mqtt"),))] == count
        assert (
            values[("ha_ingestor_points_written_total", (("measurement", "mqtt_message"),))]
            == count
        )
        assert values[("ha_ingestor_connection_up", (("target", "mqtt"),))] == 1
        assert ("ha_ingestor_build_info", (("version", "0.1.0"),)) in values
        assert values[("ha_ingestor_end_to_end_latency_seconds_count", ())] >= 1

        await asyncio.to_thread(broker.stop)
        await wait_for(
            lambda: service.service.telemetry.connections["mqtt"].state.value != "connected"
        )
        status, body = await service.get("/readyz")
        assert status == 503
        assert "mqtt" in json.loads(body)["not_ready"]
        status, body = await service.get("/status")
        state = json.loads(body)
        assert state["connections"]["mqtt"]["state"] == "reconnecting"
        assert state["counters"]["received"]["mqtt"] == count
        metrics = metric_values((await service.get("/metrics"))[1])
        assert metrics[("ha_ingestor_connection_up", (("target", "mqtt"),))] == 0

        await asyncio.to_thread(broker.start)
        await wait_for(lambda: service.service.telemetry.is_connected("mqtt"), timeout=60)
        assert (await service.get("/readyz"))[0] == 200
        assert (
            json.loads((await service.get("/status"))[1])["connections"]["mqtt"]["reconnects"] == 1
        )


async def test_logs_are_json_lines_without_secrets(
    tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, influx_db: str, topic_prefix: str
) -> None:
    secrets = {
        "mqtt_password": "mqtt-s3cret-pw",
        "influx_token": "influx-s3cret-token",
        "ha_token": "ha-s3cret-token",
    }
    env = service_env(
        tmp_path,
        influxdb,
        influx_db,
        mosquitto,
        mqtt_topics=f"{topic_prefix}/#",
        mqtt_username="someone",
        log_level="DEBUG",
        # an unreachable Home Assistant: its connection errors get logged too
        ha_url=f"http://127.0.0.1:{free_port()}",
        **secrets,
    )
    log = tmp_path / "ingestor.log"
    with ingestor_process(env, log) as ingestor:
        await ingestor.wait_ready(20, "/healthz")  # never ready: HA is unreachable
        await publish_many(mosquitto.host, mosquitto.port, [Message(f"{topic_prefix}/x", b"1")])
        await asyncio.sleep(3)
        assert await ingestor.stop(signal.SIGTERM, 20) == 0
    lines = log.read_text().splitlines()
    assert len(lines) > 5
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"event", "level", "timestamp"} <= set(events[0])
    assert any(e["event"] == "connection down" and e["target"] == "homeassistant" for e in events)
    text = log.read_text()
    for value in secrets.values():
        assert value not in text


@needs_chromium
async def test_status_page_renders_live_data_in_headless_chromium(
    tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, influx_db: str, topic_prefix: str
) -> None:
    env = service_env(tmp_path, influxdb, influx_db, mosquitto, mqtt_topics=f"{topic_prefix}/#")
    async with run_service(env, influxdb, influx_db) as service:
        for start in range(0, 6000, 1000):  # a steady stream for ~6 s: the chart needs samples
            await publish_many(
                mosquitto.host, mosquitto.port, numbered(topic_prefix, start, 1000, qos=0)
            )
            await asyncio.sleep(1)
        screenshot = Path(os.environ.get("STATUS_SCREENSHOT", tmp_path / "status.png"))
        url = service.http_url + "/"
        dom = await chromium(tmp_path / "profile-dom", url, "--dump-dom")
        await chromium(tmp_path / "profile-png", url, f"--screenshot={screenshot}")
    html = dom.stdout
    assert "HA Ingestor" in html
    assert ">mqtt<" in html, "connections are listed"
    assert ">influxdb<" in html
    assert "connected" in html
    assert re.search(r'<path[^>]* d="M[^"]*L', html), "the rate chart has a line"
    image = read_png(screenshot.read_bytes())
    assert (image.width, image.height) == (1200, 900)
    assert len(image.colours(step=7)) > 20, "the page is not blank"
