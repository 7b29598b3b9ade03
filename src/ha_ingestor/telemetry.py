"""Metrics, structured logs and connection state: one object every component is handed.

Telemetry is emitted as named events: one method logs and counts together, so the log, the
Prometheus metrics and ``/status`` can never disagree. Log messages are fixed strings; data goes
in keys. Connection state changes are logged once per change, never once per retry.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from ha_ingestor import __version__

Clock = Callable[[], float]


class ConnState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"  # gave up: needs the user (revoked token, bad credentials)
    STOPPED = "stopped"


@dataclass(slots=True)
class Connection:
    """What ``/status`` shows of one connection (mqtt, homeassistant, influxdb)."""

    target: str
    state: ConnState = ConnState.CONNECTING
    since: float = field(default_factory=time.time)
    reconnects: int = 0
    last_error: str | None = None
    last_error_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "since": self.since,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


@dataclass(slots=True, frozen=True)
class ErrorRecord:
    time: float
    component: str
    error: str


class Metrics:
    """The Prometheus instruments, registered on the registry passed in (never the global one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events_received = Counter(
            "ha_ingestor_events_received",
            "Messages and events received from a source.",
            ["source"],
            registry=registry,
        )
        self.points_written = Counter(
            "ha_ingestor_points_written",
            "Points acknowledged by InfluxDB.",
            ["measurement"],
            registry=registry,
        )
        self.events_dropped = Counter(
            "ha_ingestor_events_dropped",
            "Events or points not stored, by reason; intentional=true for filters the user set.",
            ["reason", "intentional"],
            registry=registry,
        )
        self.invalid_input = Counter(
            "ha_ingestor_invalid_input",
            "Input that was malformed but stored as faithfully as possible, by reason.",
            ["source", "reason"],
            registry=registry,
        )
        self.write_errors = Counter(
            "ha_ingestor_write_errors",
            "Failed InfluxDB write requests by kind (retryable, auth, rejected, too_large, ...).",
            ["kind"],
            registry=registry,
        )
        self.fields_left_out = Counter(
            "ha_ingestor_fields_left_out",
            "Promoted fields (JSON leaves, attr_*) not written, by measurement and reason; the "
            "value stays in the point's payload or attributes.",
            ["measurement", "reason"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "ha_ingestor_dead_lettered_lines",
            "Lines InfluxDB rejected for good, kept in the dead-letter file.",
            registry=registry,
        )
        self.write_duration = Histogram(
            "ha_ingestor_write_duration_seconds",
            "Duration of InfluxDB write requests.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.batch_size = Histogram(
            "ha_ingestor_batch_size",
            "Lines per InfluxDB write request.",
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000),
            registry=registry,
        )
        self.end_to_end_latency = Histogram(
            "ha_ingestor_end_to_end_latency_seconds",
            "Time from receiving an event to InfluxDB acknowledging it.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "ha_ingestor_spool_bytes", "Bytes of data waiting in the spool.", registry=registry
        )
        self.spool_lines = Gauge(
            "ha_ingestor_spool_lines", "Lines waiting in the spool.", registry=registry
        )
        self.spool_errors = Counter(
            "ha_ingestor_spool_errors",
            "Failed spool operations by reason (disk_full, read_only, io_error, missing, corrupt).",
            ["reason"],
            registry=registry,
        )
        self.spool_durable = Gauge(
            "ha_ingestor_spool_durable",
            "1 while the spool can make new data durable, 0 during a storage fault.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "ha_ingestor_queue_depth",
            "Items in in-memory queues, by queue.",
            ["queue"],
            registry=registry,
        )
        self.connection_up = Gauge(
            "ha_ingestor_connection_up",
            "1 while the connection to a target is up.",
            ["target"],
            registry=registry,
        )
        self.reconnects = Counter(
            "ha_ingestor_reconnects",
            "Reconnection attempts per target.",
            ["target"],
            registry=registry,
        )
        self.backfilled = Counter(
            "ha_ingestor_backfilled_points",
            "State changes recovered from Home Assistant's history after a gap.",
            registry=registry,
        )
        self.build_info = Info(
            "ha_ingestor_build", "Version of the running HA Ingestor.", registry=registry
        )
        self.build_info.info({"version": __version__})


class Telemetry:
    """Logs and counts together; keeps the per-connection state ``/status`` and ``/readyz`` read."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        logger: Any | None = None,
        clock: Clock = time.time,
        max_recent_errors: int = 50,
    ) -> None:
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.log: Any = logger if logger is not None else structlog.get_logger("ha_ingestor")
        self.clock = clock
        self.connections: dict[str, Connection] = {}
        self.recent_errors: deque[ErrorRecord] = deque(maxlen=max_recent_errors)
        self.started_at = clock()
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    # --- connections -----------------------------------------------------------------------------
    def connection(self, target: str) -> Connection:
        conn = self.connections.get(target)
        if conn is None:
            conn = self.connections[target] = Connection(target, since=self.clock())
            self.metrics.connection_up.labels(target).set(0)
        return conn

    def set_state(self, target: str, state: ConnState, error: str | None = None) -> None:
        """Record a connection state; logs only when the state actually changes."""
        conn = self.connection(target)
        now = self.clock()
        if error is not None:
            conn.last_error = error
            conn.last_error_at = now
        if state == conn.state:
            return
        previous = conn.state
        conn.state = state
        conn.since = now
        self.metrics.connection_up.labels(target).set(1 if state == ConnState.CONNECTED else 0)
        if state == ConnState.RECONNECTING and previous == ConnState.CONNECTED:
            conn.reconnects += 1
            self.metrics.reconnects.labels(target).inc()
        if state == ConnState.CONNECTED:
            self.log.info("connection up", target=target, previous=previous.value)
        elif state == ConnState.FAILED:
            self.log.error("connection failed", target=target, error=error)
            self._remember(target, error or "failed")
        elif state == ConnState.STOPPED:
            self.log.info("connection stopped", target=target)
        else:
            self.log.warning("connection down", target=target, state=state.value, error=error)
            if error:
                self._remember(target, error)

    def is_connected(self, target: str) -> bool:
        conn = self.connections.get(target)
        return conn is not None and conn.state == ConnState.CONNECTED

    # --- named events ----------------------------------------------------------------------------
    def error(self, component: str, message: str, **data: Any) -> None:
        """An error worth showing on the status page (not per-message noise)."""
        self.log.error(message, component=component, **data)
        detail = data.get("error")
        self._remember(component, f"{message}: {detail}" if detail else message)

    def dropped(self, reason: str, count: int = 1, *, intentional: bool) -> None:
        self.metrics.events_dropped.labels(reason, "true" if intentional else "false").inc(count)

    def invalid(self, source: str, reason: str, **data: Any) -> None:
        """Malformed input that is still stored (e.g. invalid UTF-8 payload kept as base64)."""
        self.metrics.invalid_input.labels(source, reason).inc()
        self.log.debug("invalid input", source=source, reason=reason, **data)

    def warn_throttled(self, key: str, interval: float, message: str, **data: Any) -> None:
        """Log a warning at most once per ``interval`` seconds per ``key`` (no log storms);
        the next one says how many were held back."""
        now = self.clock()
        last = self._last_logged.get(key)
        if last is not None and now - last < interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last_logged[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            data["repeated"] = suppressed
        self.log.warning(message, **data)

    def _remember(self, component: str, error: str) -> None:
        self.recent_errors.append(ErrorRecord(self.clock(), component, error))


REDACTED = "[redacted]"
_SECRET_KEY = re.compile(r"token|passw|secret|authorization|api_?key|credential", re.IGNORECASE)
# ``scheme://user:password@host`` and ``Authorization: Bearer <token>``-like text inside values.
_URL_PASSWORD = re.compile(r"(?<=://)([^/\s:@]*):[^/\s@]+@")
_AUTH_HEADER = re.compile(
    r"\b(Bearer|Token|Basic)\s+(?=[\w.~+/=-]*[\d.~+/=-])[\w.~+/=-]{8,}"  # a digit or symbol: not a word
)


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Processor: defence in depth so a secret passed to a log call never reaches the output.

    Values of keys named like a secret (``token``, ``password``, ``secret``, ...) are replaced;
    passwords in URLs and bearer/basic credentials are masked inside any string value.
    """
    for key, value in event.items():
        if value is None or isinstance(value, bool):
            continue
        if _SECRET_KEY.search(key):
            event[key] = REDACTED
        elif isinstance(value, str) and ("@" in value or " " in value):
            masked = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", value)
            event[key] = _AUTH_HEADER.sub(rf"\1 {REDACTED}", masked)
    return event


def configure_logging(level: str = "INFO", fmt: str = "json", stream: Any = None) -> None:
    """Route structlog and the standard library's logging to JSON lines (or console text)."""
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party libraries log per-packet detail at DEBUG/INFO; keep them to warnings.
    for noisy in ("aiohttp.access",):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
