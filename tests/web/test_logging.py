"""JSON log lines: one valid object per line, and no secret value in any of them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from ha_ingestor.telemetry import REDACTED, ConnState, Telemetry, configure_logging

SECRETS = ("mqtt-s3cret-pw", "influx-s3cret-token", "eyJhbGciOi.JIUzI1NiJ9.ha-s3cret", "pw-in-url")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream)
    yield stream
    configure_logging("INFO", "console")  # what the test suite uses everywhere else


def lines_of(stream: io.StringIO) -> list[dict[str, object]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # each line is one JSON object


def test_structlog_and_stdlib_records_are_json_lines(log_stream: io.StringIO) -> None:
    telemetry = Telemetry()
    telemetry.set_state("mqtt", ConnState.RECONNECTING, error='refused "quoted"\nnext line')
    telemetry.error("spool", "spool commit failed", error="disk full")
    logging.getLogger("aiohttp.client").warning("plain %s record", "stdlib")
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger("ha_ingestor").exception("unexpected error", component="writer")

    events = lines_of(log_stream)
    assert len(events) == 4
    for event in events:
        assert {"event", "level", "timestamp"} <= set(event)
    assert events[0]["event"] == "connection down"
    assert events[0]["error"] == 'refused "quoted"\nnext line'
    assert events[1] == events[1] | {"event": "spool commit failed", "level": "error"}
    assert events[2]["event"] == "plain stdlib record"
    assert "ValueError: boom" in str(events[3]["exception"])


def test_no_secret_value_reaches_the_log(log_stream: io.StringIO) -> None:
    mqtt_password, influx_token, ha_token, url_password = SECRETS
    log = structlog.get_logger("ha_ingestor")
    log.info("starting", influx_url=f"http://admin:{url_password}@db:8086", mqtt=True)
    log.warning("auth", ha_token=ha_token, influx_token=influx_token, password=mqtt_password)
    log.error("request failed", error=f"401 with headers {{'Authorization': 'Bearer {ha_token}'}}")
    log.info("Token validation failed")  # ordinary words stay
    logging.getLogger("aiohttp.client").warning("login", extra={"mqtt_password": mqtt_password})

    text = log_stream.getvalue()
    for secret in SECRETS:
        assert secret not in text
    events = lines_of(log_stream)
    assert events[0]["influx_url"] == f"http://admin:{REDACTED}@db:8086"
    assert events[0]["mqtt"] is True
    assert events[1]["ha_token"] == events[1]["influx_token"] == events[1]["password"] == REDACTED
    assert f"Bearer {REDACTED}" in str(events[2]["error"])
    assert events[3]["event"] == "Token validation failed"
    assert events[4]["mqtt_password"] == REDACTED


def test_console_format_is_redacted_too() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "console", stream)
    try:
        structlog.get_logger("ha_ingestor").info("auth", influx_token=SECRETS[1])
    finally:
        configure_logging("INFO", "console")
    assert SECRETS[1] not in stream.getvalue()
    assert REDACTED in stream.getvalue()
