"""Home Assistant events → ``ha_state`` and ``ha_event`` points (DESIGN §4). Pure functions.

``state_changed`` becomes one ``ha_state`` point at the new state's ``last_updated`` (removal:
at ``time_fired``); every other event becomes one ``ha_event`` point at ``time_fired``.
Timestamps keep Home Assistant's microseconds exactly (parsed as integers, never via floats).
A state recovered from the recorder's history maps to the very same series and time, so a
back-filled point and its live twin collapse into one in InfluxDB.

Lean by default (docs/schema.md): ``attributes`` only when they differ from the previous state's
(live: ``old_state``; history: the previous row — the same rule, so both give the same point),
``last_changed`` only when it differs from the point's time, ``previous_state`` not at all, and
``context_*`` only when another stored event shares the context. ``state_fields_always`` turns
each back on. ``attr_*`` fields are promoted within the measurement's column budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import translate
from typing import Any

import orjson

from ha_ingestor.config import STATE_FIELD_CHOICES
from ha_ingestor.pipeline.columns import ColumnBudget
from ha_ingestor.pipeline.values import to_value
from ha_ingestor.record import FieldValue, Point

STATE_MEASUREMENT = "ha_state"
EVENT_MEASUREMENT = "ha_event"
#: ``ha_state`` fields left out of a point when they carry nothing new, unless named in
#: ``Mapper.state_fields_always``.
OPTIONAL_STATE_FIELDS = STATE_FIELD_CHOICES
#: Columns of ``ha_state`` that are not ``attr_*``: time, tags (with ``floor``) and its own
#: fields (with ``labels``, ``last_reported``, ``truncated``), plus room for a few more.
STATE_FIXED_COLUMNS = 1 + 9 + 12 + 8
_MAX_LINKED_CONTEXTS = 10_000
#: InfluxDB 2.x and 3.x refuse string values over 1 MiB; the line's other parts need room too.
MAX_STRING_BYTES = 1024 * 1024 - 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time_ns(text: str) -> int:
    """ISO-8601 (as Home Assistant writes it, microseconds) → integer nanoseconds since epoch."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _datetime_ns(moment)


def epoch_to_ns(seconds: float) -> int:
    """The recorder's and history's float epoch seconds → ns, converted exactly as Home
    Assistant turns the same float into the datetime its live events carry
    (``datetime.fromtimestamp(seconds, UTC)``: round-half-even to the microsecond).
    ``round(seconds * 1e6)`` differs by 1 µs for about one float in eight: the product is
    rounded once more before ``round`` sees it."""
    return _datetime_ns(datetime.fromtimestamp(seconds, UTC))


def _datetime_ns(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def format_time_ns(time_ns: int) -> str:
    """Integer ns → ISO-8601 UTC with microseconds (what Home Assistant's API accepts)."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC).replace(microsecond=nanos // 1000)
    return moment.isoformat(timespec="microseconds")


def _seconds(time_ns: int) -> float:
    """Epoch seconds of a µs-precise time, computed from whole microseconds so that a live
    event's ``last_changed`` and the recorder's float of the same instant are the same float."""
    return (time_ns // 1000) / 1_000_000


class EntityFilter:
    """Include/exclude entity-id globs (``sensor.*``), compiled once, answers cached."""

    def __init__(self, include: list[str], exclude: list[str]) -> None:
        self._include = re.compile("|".join(translate(g) for g in include)) if include else None
        self._exclude = re.compile("|".join(translate(g) for g in exclude)) if exclude else None
        self._cache: dict[str, bool] = {}

    def allows(self, entity_id: str) -> bool:
        allowed = self._cache.get(entity_id)
        if allowed is None:
            allowed = (self._include is None or bool(self._include.match(entity_id))) and not (
                self._exclude is not None and self._exclude.match(entity_id)
            )
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[entity_id] = allowed
        return allowed


@dataclass(frozen=True, slots=True)
class EntityInfo:
    """What the registries say about an entity: the enrichment tags."""

    area: str | None = None
    device: str | None = None
    platform: str | None = None
    floor: str | None = None  # of the area
    labels: str | None = None  # the entity's label names, sorted, comma-separated


@dataclass
class Mapper:
    """Turns events into points with the tags and filters of one configuration."""

    instance: str
    static_tags: dict[str, str] = field(default_factory=dict)
    exclude_attributes: frozenset[str] = frozenset()
    entity_filter: EntityFilter = field(default_factory=lambda: EntityFilter([], []))
    exclude_event_types: frozenset[str] = frozenset()
    entity_info: Callable[[str], EntityInfo] = lambda _entity_id: EntityInfo()
    state_fields_always: frozenset[str] = frozenset()
    columns: ColumnBudget | None = None
    # Context ids of stored events (call_service, automation_triggered...), newest last.
    _linked_contexts: dict[str, None] = field(default_factory=dict, repr=False)

    # --- state changes ---------------------------------------------------------------------------
    def state_point(
        self,
        entity_id: str,
        new_state: Mapping[str, Any] | None,
        old_state: Mapping[str, Any] | None,
        time_fired: str,
        context: Mapping[str, Any] | None = None,
    ) -> Point | None:
        if not self.entity_filter.allows(entity_id):
            return None
        tags = self._state_tags(entity_id, new_state or old_state or {})
        fields: dict[str, FieldValue] = {}
        if new_state is None:
            fields["state"] = ""
            fields["removed"] = True
            time_ns = parse_time_ns(time_fired)
        else:
            state = str(new_state.get("state", ""))
            fields["state"] = state
            value = to_value(state)
            if value is not None:
                fields["value"] = value
            previous_attributes = None if old_state is None else old_state.get("attributes") or {}
            self._attribute_fields(new_state.get("attributes") or {}, fields, previous_attributes)
            time_ns = parse_time_ns(str(new_state.get("last_updated") or time_fired))
            last_changed = new_state.get("last_changed")
            if isinstance(last_changed, str):
                self._last_changed_field(parse_time_ns(last_changed), time_ns, fields)
            self._last_reported_field(new_state.get("last_reported"), time_ns, fields)
            context = new_state.get("context") or context
        if old_state is not None and "previous_state" in self.state_fields_always:
            fields["previous_state"] = str(old_state.get("state", ""))
        if self._context_is_linked(context):
            _context_fields(context, fields)
        self._labels_field(entity_id, fields)
        return Point(STATE_MEASUREMENT, tags, fields, time_ns)

    def history_point(
        self, entity_id: str, row: Mapping[str, Any], previous: Mapping[str, Any] | None
    ) -> Point | None:
        """A row of ``history/history_during_period`` (compressed keys ``s``, ``a``, ``lu``,
        ``lc``) as the same point the live event made: same series, same time, same fields —
        except the ``context_*`` fields, which history does not have, and attributes the
        recorder does not keep (an integration's unrecorded attributes, ``supported_features``,
        ``attribution``). ``previous`` is the entity's row before this one, if known.

        The recorder stores an entity's removal as a row with state "" and no attributes: it
        becomes the removal point, tagged from the previous row like the live one.
        """
        if not self.entity_filter.allows(entity_id):
            return None
        attributes = row.get("a") or {}
        state = str(row.get("s") or "")
        time_ns = epoch_to_ns(float(row["lu"]))
        fields: dict[str, FieldValue] = {"state": state}
        if is_removal_row(row):
            tags = self._state_tags(entity_id, {"attributes": (previous or {}).get("a") or {}})
            fields["removed"] = True
        else:
            tags = self._state_tags(entity_id, {"attributes": attributes})
            value = to_value(state)
            if value is not None:
                fields["value"] = value
            # Like a live event for an added entity, a row after a removal has no previous state.
            known = previous is not None and not is_removal_row(previous)
            previous_attributes = (previous or {}).get("a") or {} if known else None
            self._attribute_fields(attributes, fields, previous_attributes)
            changed = row.get("lc")
            changed_ns = epoch_to_ns(float(changed)) if changed else time_ns
            self._last_changed_field(changed_ns, time_ns, fields)
        if (
            previous is not None
            and not is_removal_row(previous)
            and "previous_state" in self.state_fields_always
        ):
            fields["previous_state"] = str(previous.get("s", ""))
        self._labels_field(entity_id, fields)
        return Point(STATE_MEASUREMENT, tags, fields, time_ns)

    def _state_tags(self, entity_id: str, state: Mapping[str, Any]) -> dict[str, str]:
        attributes = state.get("attributes") or {}
        tags = {
            **self.static_tags,
            "entity_id": entity_id,
            "domain": entity_id.partition(".")[0],
            "instance": self.instance,
        }
        device_class = attributes.get("device_class")
        if isinstance(device_class, str):
            tags["device_class"] = device_class
        unit = attributes.get("unit_of_measurement")
        if isinstance(unit, str):
            tags["unit"] = unit
        info = self.entity_info(entity_id)
        if info.area:
            tags["area"] = info.area
        if info.device:
            tags["device"] = info.device
        if info.platform:
            tags["platform"] = info.platform
        if info.floor:
            tags["floor"] = info.floor
        return tags

    def _labels_field(self, entity_id: str, fields: dict[str, FieldValue]) -> None:
        """Labels are a field, not a tag: users add them without bound."""
        labels = self.entity_info(entity_id).labels
        if labels:
            fields["labels"] = labels

    def _attribute_fields(
        self,
        attributes: Mapping[str, Any],
        fields: dict[str, FieldValue],
        previous: Mapping[str, Any] | None,
    ) -> None:
        """``attributes`` (JSON) unless the previous state, when known, had the same ones;
        ``attr_*`` for numeric and boolean attributes on every point, within the budget."""
        excluded = self.exclude_attributes
        kept = {k: v for k, v in attributes.items() if k not in excluded}
        if (
            previous is None
            or "attributes" in self.state_fields_always
            or kept != {k: v for k, v in previous.items() if k not in excluded}
        ):
            _capped_json("attributes", kept, fields)
        columns = self.columns
        left_out = 0
        for name, value in kept.items():
            if type(value) is bool:
                number = 1.0 if value else 0.0
            elif type(value) in (int, float) and math.isfinite(value):
                number = float(value)
            else:
                continue
            key = f"attr_{name}"
            if columns is None or columns.admit(key):
                fields[key] = number
            else:
                left_out += 1  # past the column budget: only in the attributes JSON
        if left_out and columns is not None:
            columns.left_out(left_out)

    def _last_changed_field(
        self, last_changed_ns: int, time_ns: int, fields: dict[str, FieldValue]
    ) -> None:
        """``last_changed`` when it says something the point's time does not (the state
        stayed, attributes changed), or always when configured."""
        if last_changed_ns != time_ns or "last_changed" in self.state_fields_always:
            fields["last_changed"] = _seconds(last_changed_ns)

    def _last_reported_field(
        self, last_reported: Any, time_ns: int, fields: dict[str, FieldValue]
    ) -> None:
        """``last_reported`` (Home Assistant 2024.4+): when the state was last written, changed
        or not. A state change reports it equal to its own time, so by default it is stored only
        when it says more — which also keeps a back-filled point (history has no
        ``last_reported``) equal to the live one."""
        if not isinstance(last_reported, str):
            return
        reported_ns = parse_time_ns(last_reported)
        if reported_ns != time_ns or "last_reported" in self.state_fields_always:
            fields["last_reported"] = _seconds(reported_ns)

    def _context_is_linked(self, context: Mapping[str, Any] | None) -> bool:
        """Whether a state's context links it to something: a stored event of the same
        context (a service call, an automation, a script) or a parent context. A user alone
        is not a link: a client pushing states through the REST API sets it on every one."""
        if not context:
            return False
        if "context" in self.state_fields_always:
            return True
        if context.get("parent_id"):
            return True
        return context.get("id") in self._linked_contexts

    def _remember_context(self, context: Mapping[str, Any] | None) -> None:
        context_id = context.get("id") if context else None
        if isinstance(context_id, str) and context_id:
            linked = self._linked_contexts
            linked[context_id] = None
            if len(linked) > _MAX_LINKED_CONTEXTS:
                del linked[next(iter(linked))]

    # --- other events ----------------------------------------------------------------------------
    def event_point(self, event: Mapping[str, Any]) -> Point | None:
        event_type = str(event.get("event_type", ""))
        if event_type in self.exclude_event_types:
            return None
        data = event.get("data") or {}
        tags = {
            **self.static_tags,
            "event_type": event_type,
            "origin": str(event.get("origin", "")),
            "instance": self.instance,
        }
        for key in ("domain", "service"):
            if isinstance(data.get(key), str):
                tags[key] = data[key]
        entity_id = _single_entity(data)
        if entity_id is not None:
            if not self.entity_filter.allows(entity_id):
                return None
            tags["entity_id"] = entity_id
        fields: dict[str, FieldValue] = {}
        _capped_json("data", data, fields)
        if isinstance(data.get("name"), str):
            fields["name"] = data["name"]
        _context_fields(event.get("context"), fields)
        self._remember_context(event.get("context"))
        return Point(EVENT_MEASUREMENT, tags, fields, parse_time_ns(str(event["time_fired"])))

    def map_event(self, event: Mapping[str, Any]) -> Point | None:
        """Any bus event → its point, or None when a filter leaves it out."""
        if event.get("event_type") == "state_changed":
            data = event.get("data") or {}
            return self.state_point(
                str(data.get("entity_id", "")),
                data.get("new_state"),
                data.get("old_state"),
                str(event["time_fired"]),
                event.get("context"),
            )
        return self.event_point(event)


def _capped_json(name: str, value: Mapping[str, Any], fields: dict[str, FieldValue]) -> None:
    """``value`` as JSON (sorted keys) in field ``name``; longer than InfluxDB's string limit
    (1 MiB on 2.x and 3.x), cut at a character boundary and marked ``truncated``."""
    raw = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    if len(raw) > MAX_STRING_BYTES:
        fields[name] = raw[:MAX_STRING_BYTES].decode(errors="ignore")
        fields["truncated"] = True
    else:
        fields[name] = raw.decode()


def is_removal_row(row: Mapping[str, Any]) -> bool:
    """A history row the recorder wrote for an entity's removal (no attributes, and state ""
    or — as 2024.3 stores it — NULL)."""
    return row.get("s") in ("", None) and not row.get("a")


def _single_entity(data: Mapping[str, Any]) -> str | None:
    for holder in (data, data.get("service_data") or {}):
        if not isinstance(holder, Mapping):
            continue
        entity = holder.get("entity_id")
        if isinstance(entity, str) and "," not in entity:
            return entity
        if isinstance(entity, list) and len(entity) == 1 and isinstance(entity[0], str):
            return entity[0]
    return None


def _context_fields(context: Mapping[str, Any] | None, fields: dict[str, FieldValue]) -> None:
    if not context:
        return
    for key, name in (
        ("id", "context_id"),
        ("user_id", "context_user_id"),
        ("parent_id", "context_parent_id"),
    ):
        value = context.get(key)
        if isinstance(value, str) and value:
            fields[name] = value
