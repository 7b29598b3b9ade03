"""Readiness: every enabled source connected, and the sink writing or safely spooling.

Ready means all of:

- every enabled source (``mqtt`` when ``HA_INGESTOR_MQTT_HOST`` is set, ``homeassistant`` when
  the URL and token are set) is ``connected``;
- the sink (``influxdb``) has not ``failed`` (401/403: it needs the user, retrying cannot help);
- the sink is ``connected``, or the durable spool is on and below :data:`SPOOL_FULL_FRACTION`
  of its cap, so whatever arrives while InfluxDB is away is kept;
- the spool can store new data (no storage fault: disk full, read-only, I/O errors, ...).

:func:`not_ready` is a pure function of its inputs; :class:`Readiness` binds them for the
HTTP server.
"""

from __future__ import annotations

from datetime import UTC, datetime

from ha_ingestor.config import Settings
from ha_ingestor.pipeline.buffer import Buffer, StorageStatus
from ha_ingestor.telemetry import Connection, ConnState, Telemetry

SINK = "influxdb"
SPOOL = "spool"

#: Above this share of ``HA_INGESTOR_SPOOL_MAX_BYTES`` the spool is about to drop data: it no
#: longer counts as safely spooling. (The spool evicts to stay under the cap, so it never
#: reports exactly 100 %.)
SPOOL_FULL_FRACTION = 0.95


def enabled_sources(settings: Settings) -> list[str]:
    """Connection names of the sources this configuration runs."""
    return [
        name
        for name, enabled in (
            ("mqtt", settings.mqtt_enabled),
            ("homeassistant", settings.ha_enabled),
        )
        if enabled
    ]


def not_ready(
    settings: Settings,
    connections: dict[str, Connection],
    depth: tuple[int, int],
    storage: StorageStatus | None = None,
) -> dict[str, str]:
    """What is not ready, by component, as a human-readable reason; empty when ready.

    ``connections`` is :attr:`Telemetry.connections`, ``depth`` is :meth:`Buffer.depth`,
    ``storage`` is :meth:`Buffer.storage`.
    """
    problems: dict[str, str] = {}
    if storage is not None and storage.faulted:
        problems[SPOOL] = describe_storage(settings, storage, depth)
    for target in enabled_sources(settings):
        conn = connections.get(target)
        if conn is None:
            problems[target] = "not started"
        elif conn.state != ConnState.CONNECTED:
            problems[target] = describe(conn)
    sink = connections.get(SINK)
    if sink is not None and sink.state == ConnState.FAILED:
        problems[SINK] = describe(sink)
    elif sink is None or sink.state != ConnState.CONNECTED:
        state = describe(sink) if sink is not None else "not connected yet"
        if not settings.spool_enabled:
            problems[SINK] = f"{state}; spool disabled, nothing is kept safe"
        else:
            used = depth[1] / settings.spool_max_bytes
            if used >= SPOOL_FULL_FRACTION:
                problems[SINK] = f"{state}; spool {used:.0%} full"
    return problems


def describe_storage(settings: Settings, storage: StorageStatus, depth: tuple[int, int]) -> str:
    """``disk_full since …: database or disk is full (/data/spool); new data is not accepted
    …; free space on the spool's disk …``."""
    since = ""
    if storage.since is not None:
        since = " since " + datetime.fromtimestamp(storage.since, UTC).isoformat(timespec="seconds")
    text = f"{storage.state}{since}: {storage.error} ({settings.spool_dir})"
    text += "; new data is not accepted (MQTT messages are not acknowledged)"
    if depth[0]:
        text += f"; {depth[0]} lines wait to be written to InfluxDB"
    return f"{text}; {storage.advice}" if storage.advice else text


def describe(conn: Connection) -> str:
    """``reconnecting since 2026-01-02T03:04:05+00:00: connection refused``."""
    since = datetime.fromtimestamp(conn.since, UTC).isoformat(timespec="seconds")
    text = f"{conn.state.value} since {since}"
    return f"{text}: {conn.last_error}" if conn.last_error else text


class Readiness:
    """Readiness of one running service (what ``/readyz`` answers)."""

    def __init__(self, settings: Settings, telemetry: Telemetry, buffer: Buffer) -> None:
        self.settings = settings
        self._telemetry = telemetry
        self._buffer = buffer

    def problems(self) -> dict[str, str]:
        """What is not ready, by component; empty when ready."""
        buffer = self._buffer
        return not_ready(
            self.settings, self._telemetry.connections, buffer.depth(), buffer.storage()
        )

    def is_ready(self) -> bool:
        return not self.problems()
