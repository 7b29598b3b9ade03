"""MQTT message → one ``mqtt_message`` line of line protocol (the hot path).

Per-topic work (escaping the series key, the discovery look-up) is done once and cached; per
message there is only payload inspection and string concatenation.

Fields (DESIGN §4): ``payload`` (string; base64 with ``encoding``="base64" when not UTF-8;
truncated with ``truncated``=true over the size cap), ``value`` (float for numbers and
boolean-like words), one float per numeric/boolean leaf of a JSON object named by its dotted path,
``qos`` (int), ``retained`` (bool), ``size`` (int). A leaf whose path would collide with one of
these names, or with a tag of the measurement, is stored as ``json.<path>`` so a name never
carries two types (InfluxDB 3 refuses a field named like a tag). Leaves are promoted within the
measurement's column budget (:mod:`ha_ingestor.pipeline.columns`); past it they stay only in
``payload``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import orjson

from ha_ingestor.line_protocol import escape_field_key, escape_string, series_key
from ha_ingestor.pipeline.columns import ColumnBudget
from ha_ingestor.pipeline.mqtt_discovery import DiscoveryMap
from ha_ingestor.pipeline.values import to_value

MEASUREMENT = "mqtt_message"
# Names this measurement uses itself, and names InfluxDB refuses or reserves as field keys.
RESERVED_FIELDS = frozenset(
    {"payload", "value", "qos", "retained", "size", "encoding", "truncated"}
    | {"time", "_time", "_field", "_measurement", "_start", "_stop", "_value"}
)
TAGS = frozenset({"topic", "instance", "entity_id", "device"})
#: Columns of the measurement that are not promoted leaves: time, tags, its own fields, and
#: room for a few more.
FIXED_COLUMNS = 1 + len(TAGS) + 7 + 8
_MAX_CACHED_TOPICS = 100_000
_MAX_CACHED_KEYS = 10_000
_SPACE = " \t\r\n"  # JSON's whitespace: what may come before the "{" of an object
#: ",qos=Ni,retained=B,size=" by [qos][retained]
_QOS_RETAINED = tuple(
    (f",qos={qos}i,retained=false,size=", f",qos={qos}i,retained=true,size=") for qos in range(3)
)


class MqttMessageEncoder:
    """Encodes MQTT messages as ``mqtt_message`` lines. One instance per MQTT source."""

    def __init__(
        self,
        *,
        instance: str,
        static_tags: dict[str, str],
        discovery: DiscoveryMap,
        max_payload_bytes: int = 65536,
        max_fields: int = 64,
        on_invalid: Callable[[str, str], None] | None = None,
        columns: ColumnBudget | None = None,
    ) -> None:
        self._instance = instance
        self._static_tags = static_tags
        self._discovery = discovery
        self._max_payload = max_payload_bytes
        self._max_fields = max_fields
        self._on_invalid = on_invalid or (lambda _reason, _topic: None)
        self._series: dict[str, str] = {}
        self._assignments: dict[str, str] = {}  # "" for a path past the column budget
        self._reserved = RESERVED_FIELDS | TAGS | frozenset(static_tags)
        self._columns = columns
        self._left_out = 0  # leaves of the message being encoded left out by the budget

    def limit_columns(self, columns: ColumnBudget) -> None:
        """Promote new leaves only within ``columns`` (from now on)."""
        self._columns = columns
        self._assignments.clear()

    def discovery_changed(self) -> None:
        self._series.clear()

    def series_for(self, topic: str) -> str:
        key = self._series.get(topic)
        if key is None:
            if len(self._series) >= _MAX_CACHED_TOPICS:
                self._series.clear()
            tags = {**self._static_tags, "topic": topic, "instance": self._instance}
            entity_id, device = self._discovery.lookup(topic)
            if entity_id:
                tags["entity_id"] = entity_id
            elif device:
                tags["device"] = device
            key = self._series[topic] = series_key(MEASUREMENT, tags)
        return key

    def encode(self, topic: str, payload: bytes, qos: int, retained: bool, time_ns: int) -> str:
        series = self._series.get(topic) or self.series_for(topic)
        size = len(payload)
        if size > self._max_payload:
            return self._encode_oversized(series, topic, payload, qos, retained, time_ns)
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            return self._encode_binary(series, topic, payload, qos, retained, size, "", time_ns)
        first = text[:1]
        if first == "{" or (first in _SPACE and text.lstrip()[:1] == "{"):
            promoted = self._json_fields(payload, topic)
        else:
            number = to_value(text) if len(text) < 64 else None
            promoted = "" if number is None else f",value={number!r}"
        return (
            f"{series} payload={escape_string(text)}{promoted}"
            f"{_QOS_RETAINED[qos][retained]}{size}i {time_ns}"
        )

    def _encode_oversized(
        self, series: str, topic: str, payload: bytes, qos: int, retained: bool, time_ns: int
    ) -> str:
        """A payload over the size cap: its first ``max_payload_bytes`` as text (a partial UTF-8
        character at the cut dropped), marked ``truncated``; no promoted fields."""
        self._on_invalid("oversized", topic)
        size = len(payload)
        payload = payload[: self._max_payload]
        try:
            text: str | None = payload.decode()
        except UnicodeDecodeError:
            text = _decode_truncated(payload)
        if text is None:
            return self._encode_binary(
                series, topic, payload, qos, retained, size, ",truncated=true", time_ns
            )
        return (
            f"{series} payload={escape_string(text)}"
            f"{_QOS_RETAINED[qos][retained]}{size}i,truncated=true {time_ns}"
        )

    def _encode_binary(
        self,
        series: str,
        topic: str,
        payload: bytes,
        qos: int,
        retained: bool,
        size: int,
        extra: str,
        time_ns: int,
    ) -> str:
        """A payload that is not UTF-8: stored as base64, marked with ``encoding``."""
        self._on_invalid("invalid_utf8", topic)
        return (
            f'{series} payload="{base64.b64encode(payload).decode()}",encoding="base64"'
            f"{_QOS_RETAINED[qos][retained]}{size}i{extra} {time_ns}"
        )

    def _json_fields(self, payload: bytes, topic: str) -> str:
        """``,path=float,...`` for the numeric and boolean leaves of a JSON-object payload."""
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._on_invalid("invalid_json", topic)
            return ""
        if type(document) is not dict:
            return ""
        parts: list[str] = []
        if self._flatten(document, "", parts):
            self._on_invalid("too_many_fields", topic)
        if self._left_out:
            if self._columns is not None:
                self._columns.left_out(self._left_out)
            self._left_out = 0
        return "".join(parts)

    def _flatten(self, obj: dict[str, Any], prefix: str, parts: list[str]) -> bool:
        """Append ``",key="`` and the float's text for numeric/bool leaves (two items per
        field); True when the cap cut some off."""
        # The per-message hot spot: type() dispatch, cached ",key=" prefixes and no string
        # concatenation per leaf (the caller joins the parts once). orjson yields finite floats
        # only (it refuses NaN, Infinity and 1e400).
        assignments = self._assignments
        max_parts = 2 * self._max_fields
        for key, value in obj.items():
            kind = type(value)
            if kind is float:
                text = repr(value)
            elif kind is int:
                text = f"{value}.0"  # the same float, without a float() round trip
            elif kind is bool:
                text = "1.0" if value else "0.0"
            elif kind is dict:
                if key and self._flatten(value, prefix + key + ".", parts):
                    return True
                continue
            else:
                continue  # strings, arrays and nulls stay only in the payload
            if not key:
                continue  # an empty key cannot name a field
            if len(parts) >= max_parts:
                return True
            path = prefix + key if prefix else key
            assignment = assignments.get(path)
            if assignment is None:
                assignment = self._assignment(path)
            if assignment:
                parts.append(assignment)
                parts.append(text)
            else:
                self._left_out += 1  # past the column budget: only in the payload
        return False

    def _assignment(self, path: str) -> str:
        """``,escaped_field_key=`` for a dotted path, cached; "" past the column budget."""
        if len(self._assignments) >= _MAX_CACHED_KEYS:
            self._assignments.clear()
        name = "json." + path if path in self._reserved else path
        columns = self._columns
        if columns is not None and not columns.admit(name):
            self._assignments[path] = ""
            return ""
        assignment = self._assignments[path] = "," + escape_field_key(name) + "="
        return assignment


def _decode_truncated(payload: bytes) -> str | None:
    """Decode a payload cut at the size cap, dropping a partial UTF-8 character at the end."""
    for cut in range(1, 4):
        try:
            return payload[:-cut].decode()
        except UnicodeDecodeError:
            continue
    return None
