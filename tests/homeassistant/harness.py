"""Running the Home Assistant source in-process against the real Home Assistant, with a buffer
that records every line, and reading those lines back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry

from ha_ingestor.config import load_settings
from ha_ingestor.pipeline.buffer import Checkpoints, MemoryBuffer, MemoryCheckpoints
from ha_ingestor.record import FieldValue
from ha_ingestor.sources.homeassistant import HomeAssistantSource, decide_instance
from ha_ingestor.telemetry import ConnState, Telemetry
from tests.support.homeassistant import HomeAssistant
from tests.support.waiting import wait_for


class RecordingBuffer(MemoryBuffer):
    """A memory buffer that keeps a copy of every line added."""

    def __init__(self, max_lines: int = 1_000_000) -> None:
        super().__init__(max_lines=max_lines)
        self.lines: list[str] = []

    def add(self, line: str) -> asyncio.Future[None]:
        self.lines.append(line)
        return super().add(line)


@dataclass(frozen=True)
class Line:
    """One parsed line of line protocol."""

    measurement: str
    series: str  # measurement and tags exactly as written: InfluxDB's series key
    tags: dict[str, str]
    fields: dict[str, FieldValue]
    time_ns: int

    @property
    def key(self) -> tuple[str, int]:
        """(entity_id, time in µs): what the recorder's rows are compared by."""
        return self.tags.get("entity_id", ""), self.time_ns // 1000


def parse_line(line: str) -> Line:
    """Parse what :func:`ha_ingestor.line_protocol.encode_point` writes (enough of the
    grammar for that: escaped ``,``/``=``/space in names, quoted strings, i-suffixed ints)."""
    series, rest = _split_unescaped(line, " ", 1)
    parts = _split_unescaped(series, ",")
    measurement = _unescape(parts[0])
    tags = {}
    for part in parts[1:]:
        key, value = _split_unescaped(part, "=", 1)
        tags[_unescape(key)] = _unescape(value)
    fields_text, _, timestamp = rest.rpartition(" ")
    return Line(measurement, series, tags, _parse_fields(fields_text), int(timestamp))


def _split_unescaped(text: str, separator: str, limit: int = -1) -> list[str]:
    parts: list[str] = []
    start = i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == separator and (limit < 0 or len(parts) < limit):
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _unescape(text: str) -> str:
    for char in (",", "=", " "):
        text = text.replace("\\" + char, char)
    return text


def _parse_fields(text: str) -> dict[str, FieldValue]:
    fields: dict[str, FieldValue] = {}
    i = 0
    while i < len(text):
        j = i
        while text[j] != "=" or text[j - 1] == "\\":
            j += 1
        key = _unescape(text[i:j])
        j += 1
        if text[j] == '"':
            k = j + 1
            chars: list[str] = []
            while text[k] != '"':
                if text[k] == "\\" and text[k + 1] in '"\\':
                    k += 1
                chars.append(text[k])
                k += 1
            fields[key] = "".join(chars)
            i = k + 2  # closing quote and comma
        else:
            end = text.find(",", j)
            end = len(text) if end < 0 else end
            raw = text[j:end]
            if raw in ("true", "false"):
                fields[key] = raw == "true"
            elif raw.endswith("i"):
                fields[key] = int(raw[:-1])
            else:
                fields[key] = float(raw)
            i = end + 1
    return fields


@dataclass
class SourceRun:
    source: HomeAssistantSource
    buffer: RecordingBuffer
    telemetry: Telemetry
    registry: CollectorRegistry
    checkpoints: Checkpoints
    task: asyncio.Task[None]
    _parsed: list[Line] = field(default_factory=list)

    def lines(self) -> list[Line]:
        recorded = self.buffer.lines
        if len(self._parsed) < len(recorded):
            self._parsed.extend(parse_line(x) for x in recorded[len(self._parsed) :])
        return self._parsed

    def states(self, since: float = 0.0, until: float = float("inf")) -> list[Line]:
        low, high = since * 1e9, until * 1e9
        return [x for x in self.lines() if x.measurement == "ha_state" and low <= x.time_ns <= high]

    def events(self, event_type: str, since: float = 0.0) -> list[Line]:
        return [
            x
            for x in self.lines()
            if x.measurement == "ha_event"
            and x.tags["event_type"] == event_type
            and x.time_ns >= since * 1e9
        ]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    @property
    def state(self) -> ConnState | None:
        connection = self.telemetry.connections.get("homeassistant")
        return connection.state if connection else None

    async def wait_connected(self, timeout: float = 30.0) -> None:
        await wait_for(
            lambda: self.telemetry.is_connected("homeassistant"),
            timeout=timeout,
            message="Home Assistant source connected",
        )


@contextlib.asynccontextmanager
async def running_source(
    ha: HomeAssistant,
    token: str | None = None,
    checkpoints: Checkpoints | None = None,
    url: str | None = None,
    **settings: str,
) -> AsyncIterator[SourceRun]:
    """A :class:`HomeAssistantSource` running until the block ends (``settings`` are
    ``HA_INGESTOR_*`` variables without the prefix, lower case)."""
    env = {
        "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:9",  # unused: nothing is written
        "HA_INGESTOR_HA_URL": url or ha.url,
        "HA_INGESTOR_HA_TOKEN": token or ha.token,
        "HA_INGESTOR_HA_BACKFILL_SETTLE": "5",
    }
    env |= {f"HA_INGESTOR_{k.upper()}": v for k, v in settings.items()}
    registry = CollectorRegistry()
    telemetry = Telemetry(registry)
    buffer = RecordingBuffer()
    checkpoints = checkpoints if checkpoints is not None else MemoryCheckpoints()
    loaded = load_settings(env)
    instance = await decide_instance(loaded, checkpoints)  # as the service does
    source = HomeAssistantSource(loaded, buffer, telemetry, checkpoints, instance)
    task = asyncio.create_task(source.run(), name="test-homeassistant-source")
    try:
        yield SourceRun(source, buffer, telemetry, registry, checkpoints, task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def burst_of_state_changes(ha: HomeAssistant, prefix: str, clients: int, per_client: int) -> float:
    """Set ``clients * per_client`` states from ``clients`` concurrent REST clients, as fast as
    Home Assistant takes them; returns the rate achieved (changes per second)."""

    def worker(client: int) -> None:
        for i in range(per_client):
            ha.set_state(
                f"sensor.{prefix}_{client}",
                str(i * 1.5),
                {"unit_of_measurement": "°C", "device_class": "temperature", "sequence": i},
            )

    began = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return clients * per_client / (time.monotonic() - began)


def switch_and_script(ha: HomeAssistant, times: int) -> None:
    """``times`` over: turn ``input_boolean.test_switch`` on (its automation triggers) and off,
    and run ``script.bump_level``."""
    for _ in range(times):
        ha.call_service("input_boolean", "turn_on", entity_id="input_boolean.test_switch")
        ha.call_service("input_boolean", "turn_off", entity_id="input_boolean.test_switch")
        ha.call_service("script", "bump_level")


async def wait_for_agreement(
    ha: HomeAssistant,
    run: SourceRun,
    since: float,
    until: float,
    timeout: float = 60.0,
    entity_prefix: str = "",
    both_ways: bool = True,
) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """Poll until the recorder's rows and the source's ``ha_state`` points between ``since``
    and ``until`` (epoch seconds) agree — both ways, or with ``both_ways=False`` only every
    row having its point; returns (recorded, stored) either way."""
    low, high = round(since * 1e6), round(until * 1e6)

    def in_window(keys: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        return {(e, t) for e, t in keys if low <= t <= high and e.startswith(entity_prefix)}

    recorded: set[tuple[str, int]] = set()
    stored: set[tuple[str, int]] = set()

    async def agree() -> bool:
        nonlocal recorded, stored
        rows = await asyncio.to_thread(ha.recorded_states, since, entity_prefix)
        recorded = in_window(rows)
        stored = in_window(x.key for x in run.states())
        return bool(recorded) and (recorded == stored if both_ways else recorded <= stored)

    with contextlib.suppress(TimeoutError):
        await wait_for(agree, timeout=timeout, interval=0.25, message="recorder agreement")
    return recorded, stored


class HasMetrics(Protocol):
    def metric(self, name: str, **labels: str) -> float: ...


async def wait_backfill_counted(owner: HasMetrics, at_least: float) -> None:
    """``ha_ingestor_backfilled_points_total`` reaches ``at_least``: a back-fill is counted
    once it is durable, which may be after its points show."""
    await wait_for(
        lambda: owner.metric("ha_ingestor_backfilled_points_total") >= at_least,
        timeout=30,
        message="back-filled points counted",
    )
