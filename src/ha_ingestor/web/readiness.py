"""Readiness: every enabled source connected, and the sink writing or safely spooling."""

from __future__ import annotations

from datetime import UTC, datetime

from ha_ingestor.config import Settings
from ha_ingestor.pipeline.buffer import Buffer
from ha_ingestor.telemetry import ConnState, Telemetry


class Readiness:
    def __init__(self, settings: Settings, telemetry: Telemetry, buffer: Buffer) -> None:
        self._settings = settings
        self._telemetry = telemetry
        self._buffer = buffer
        self._sources = [
            name
            for name, enabled in (
                ("mqtt", settings.mqtt_enabled),
                ("homeassistant", settings.ha_enabled),
            )
            if enabled
        ]

    def problems(self) -> dict[str, str]:
        """What is not ready, by component; empty when ready."""
        problems: dict[str, str] = {}
        for target in self._sources:
            conn = self._telemetry.connections.get(target)
            if conn is None or conn.state != ConnState.CONNECTED:
                problems[target] = _describe(conn.state if conn else ConnState.CONNECTING, conn)
        sink = self._telemetry.connections.get("influxdb")
        if sink is not None and sink.state == ConnState.FAILED:
            problems["influxdb"] = _describe(sink.state, sink)
        elif sink is None or sink.state != ConnState.CONNECTED:
            spooling = self._settings.spool_enabled
            _, size = self._buffer.depth()
            if not spooling or size >= self._settings.spool_max_bytes:
                state = sink.state if sink else ConnState.CONNECTING
                problems["influxdb"] = _describe(state, sink) + (
                    "" if spooling else " (spool disabled: nothing is safe)"
                )
        return problems


def _describe(state: ConnState, conn: object | None) -> str:
    since = getattr(conn, "since", None)
    error = getattr(conn, "last_error", None)
    text = state.value
    if since:
        text += " since " + datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds")
    if error:
        text += f": {error}"
    return text
