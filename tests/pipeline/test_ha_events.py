"""Home Assistant events → ``ha_state`` / ``ha_event`` points, and history rows → the same
points (pure functions, no server)."""

from __future__ import annotations

import calendar
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ha_ingestor.line_protocol import encode_point
from ha_ingestor.pipeline.ha_backfill import history_points
from ha_ingestor.pipeline.ha_events import (
    OPTIONAL_STATE_FIELDS,
    EntityFilter,
    EntityInfo,
    Mapper,
    epoch_to_ns,
    format_time_ns,
    parse_time_ns,
)
from ha_ingestor.record import Point

T0 = "2024-03-15T10:20:30.123456+00:00"
T0_NS = calendar.timegm((2024, 3, 15, 10, 20, 30)) * 1_000_000_000 + 123_456_000
T1 = "2024-03-15T10:21:00.000001+00:00"
T1_NS = calendar.timegm((2024, 3, 15, 10, 21, 0)) * 1_000_000_000 + 1_000
CONTEXT = {"id": "01HS0000000000000000000000", "parent_id": None, "user_id": "abc123"}


def full_mapper(**overrides: Any) -> Mapper:
    """A mapper that stores every optional field on every point (the full schema)."""
    return mapper(state_fields_always=OPTIONAL_STATE_FIELDS, **overrides)


def mapper(**overrides: Any) -> Mapper:
    options: dict[str, Any] = {"instance": "home", "static_tags": {"site": "lab"}}
    options.update(overrides)
    return Mapper(**options)


def state(
    entity_id: str,
    value: str,
    attributes: dict[str, Any] | None = None,
    last_updated: str = T1,
    last_changed: str | None = None,
) -> dict[str, Any]:
    return {
        "entity_id": entity_id,
        "state": value,
        "attributes": attributes or {},
        "last_changed": last_changed or last_updated,
        "last_updated": last_updated,
        "context": CONTEXT,
    }


def state_changed(
    entity_id: str, new: dict[str, Any] | None, old: dict[str, Any] | None, fired: str = T1
) -> dict[str, Any]:
    return {
        "event_type": "state_changed",
        "data": {"entity_id": entity_id, "new_state": new, "old_state": old},
        "origin": "LOCAL",
        "time_fired": fired,
        "context": CONTEXT,
    }


def event(event_type: str, data: dict[str, Any], fired: str = T1) -> dict[str, Any]:
    return {
        "event_type": event_type,
        "data": data,
        "origin": "LOCAL",
        "time_fired": fired,
        "context": CONTEXT,
    }


def mapped(m: Mapper, ev: dict[str, Any]) -> Point:
    point = m.map_event(ev)
    assert point is not None
    return point


# --- time ----------------------------------------------------------------------------------------
def test_times_keep_home_assistants_microseconds_exactly() -> None:
    assert parse_time_ns(T0) == T0_NS
    assert parse_time_ns("2024-03-15T10:20:30.123456Z") == T0_NS
    assert parse_time_ns("2024-03-15T11:20:30.123456+01:00") == T0_NS
    assert parse_time_ns("2024-03-15T10:20:30+00:00") == T0_NS - 123_456_000
    assert format_time_ns(T0_NS) == T0


@given(st.integers(min_value=0, max_value=4_102_444_800_000_000))  # µs up to 2100
def test_iso_and_history_floats_round_trip_to_the_same_microsecond(micros: int) -> None:
    ns = micros * 1000
    assert parse_time_ns(format_time_ns(ns)) == ns
    # the recorder's float epoch seconds (what history returns) come back to the same µs
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    assert epoch_to_ns(moment.timestamp()) == ns


@given(st.floats(min_value=1_500_000_000, max_value=2_000_000_000))
def test_raw_time_floats_convert_as_home_assistant_converts_them(seconds: float) -> None:
    # Since 2024.7 the recorder and history hold the raw time.time() float; the live event
    # carries datetime.fromtimestamp(float, UTC) of it.
    live = datetime.fromtimestamp(seconds, UTC).isoformat()
    assert epoch_to_ns(seconds) == parse_time_ns(live)


def test_a_float_that_naive_rounding_gets_one_microsecond_wrong() -> None:
    seconds = 1764612000.0000115  # seconds * 1e6 rounds up, the float itself lies below .5 µs
    assert round(seconds * 1_000_000) * 1000 != epoch_to_ns(seconds)
    assert epoch_to_ns(seconds) == parse_time_ns(datetime.fromtimestamp(seconds, UTC).isoformat())


# --- state changes -------------------------------------------------------------------------------
def test_a_numeric_state_change() -> None:
    info = EntityInfo(area="Kitchen", device="Thermometer", platform="mqtt")
    m = full_mapper(entity_info=lambda entity_id: info)
    attributes = {
        "unit_of_measurement": "°C",
        "device_class": "temperature",
        "friendly_name": "Kitchen temperature",
        "battery": 87,
        "precision": 0.5,
        "charging": True,
        "tags": ["a", "b"],
    }
    old = state("sensor.kitchen", "21.0", attributes, last_updated=T0)
    new = state("sensor.kitchen", "21.5", attributes, last_changed=T0)
    point = mapped(m, state_changed("sensor.kitchen", new, old))
    assert point.measurement == "ha_state"
    assert point.time_ns == T1_NS
    assert point.tags == {
        "site": "lab",
        "entity_id": "sensor.kitchen",
        "domain": "sensor",
        "instance": "home",
        "device_class": "temperature",
        "unit": "°C",
        "area": "Kitchen",
        "device": "Thermometer",
        "platform": "mqtt",
    }
    fields = point.fields
    assert fields["state"] == "21.5"
    assert fields["value"] == 21.5
    assert fields["previous_state"] == "21.0"
    assert (
        fields["last_changed"] == datetime.fromisoformat(T0).timestamp()
    )  # as the recorder has it
    assert fields["attr_battery"] == 87.0
    assert fields["attr_precision"] == 0.5
    assert fields["attr_charging"] == 1.0
    assert "attr_friendly_name" not in fields
    assert "attr_tags" not in fields
    assert fields["context_id"] == CONTEXT["id"]
    assert fields["context_user_id"] == "abc123"
    assert "context_parent_id" not in fields
    assert json.loads(str(fields["attributes"])) == attributes
    assert list(json.loads(str(fields["attributes"]))) == sorted(attributes), "sorted keys"
    line = encode_point(point)
    assert line.endswith(f" {T1_NS}")


def test_floor_is_a_tag_labels_a_field_and_last_reported_is_kept() -> None:
    info = EntityInfo(area="Kitchen", floor="Ground floor", labels="Critical,Energy")
    m = mapper(entity_info=lambda entity_id: info)
    new = state("sensor.meter", "5") | {"last_reported": "2024-03-15T10:22:00.000002+00:00"}
    point = mapped(m, state_changed("sensor.meter", new, None))
    assert point.tags["floor"] == "Ground floor"
    assert "labels" not in point.tags
    assert point.fields["labels"] == "Critical,Energy"
    assert point.fields["last_reported"] == (T1_NS + 60_000_001_000) // 1000 / 1_000_000
    row = {"s": "5", "a": {}, "lu": T1_NS / 1e9, "lc": T1_NS / 1e9}
    restored = m.history_point("sensor.meter", row, None)
    assert restored is not None
    assert restored.tags == point.tags
    assert restored.fields["labels"] == "Critical,Energy"


def test_last_reported_equal_to_the_time_is_left_out_so_back_fill_matches_live() -> None:
    new = state("sensor.meter", "5") | {"last_reported": T1}
    live = mapped(mapper(), state_changed("sensor.meter", new, None))
    assert "last_reported" not in live.fields
    restored = mapper().history_point("sensor.meter", {"s": "5", "a": {}, "lu": T1_NS / 1e9}, None)
    assert restored is not None
    assert restored.fields == live.fields
    kept = mapped(
        mapper(state_fields_always=frozenset({"last_reported"})),
        state_changed("sensor.meter", new, None),
    )
    assert kept.fields["last_reported"] == T1_NS // 1000 / 1_000_000


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("on", 1.0),
        ("off", 0.0),
        ("open", 1.0),
        ("closed", 0.0),
        ("home", 1.0),
        ("not_home", 0.0),
        ("locked", 1.0),
        ("unlocked", 0.0),
        ("true", 1.0),
        ("False", 0.0),
        ("-3.25", -3.25),
        ("1e3", 1000.0),
        ("unavailable", None),
        ("unknown", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        ("heat", None),
    ],
)
def test_value_only_for_numbers_and_boolean_like_states(text: str, value: float | None) -> None:
    point = mapped(mapper(), state_changed("x.y", state("x.y", text), None))
    assert point.fields["state"] == text
    assert point.fields.get("value") == value


def test_excluded_attributes_are_left_out_everywhere() -> None:
    m = mapper(exclude_attributes=frozenset({"entity_picture", "battery"}))
    new = state("sensor.a", "1", {"entity_picture": "/x.png", "battery": 3, "other": 1})
    fields = mapped(m, state_changed("sensor.a", new, None)).fields
    assert json.loads(str(fields["attributes"])) == {"other": 1}
    assert "attr_battery" not in fields
    assert fields["attr_other"] == 1.0


def test_an_added_entity_has_no_previous_state() -> None:
    point = mapped(mapper(), state_changed("light.a", state("light.a", "on"), None))
    assert "previous_state" not in point.fields
    assert point.fields["value"] == 1.0


def test_a_removed_entity_is_a_point_at_time_fired() -> None:
    old = state("sensor.gone", "5", {"unit_of_measurement": "W"}, last_updated=T0)
    point = mapped(full_mapper(), state_changed("sensor.gone", None, old, fired=T1))
    assert point.time_ns == T1_NS
    assert point.fields["state"] == ""
    assert point.fields["removed"] is True
    assert point.fields["previous_state"] == "5"
    assert point.tags["unit"] == "W", "tagged like the entity's earlier points"
    assert "attributes" not in point.fields


def test_entity_globs_include_and_exclude() -> None:
    m = mapper(entity_filter=EntityFilter(["sensor.*", "light.kitchen"], ["sensor.*_rssi"]))
    keep = ["sensor.temperature", "light.kitchen"]
    drop = ["sensor.plug_rssi", "light.hall", "switch.x"]
    for entity_id in keep:
        assert m.map_event(state_changed(entity_id, state(entity_id, "1"), None)) is not None
    for entity_id in drop:
        assert m.map_event(state_changed(entity_id, state(entity_id, "1"), None)) is None
    # events naming one excluded entity are left out too
    call = event(
        "call_service",
        {"domain": "light", "service": "on", "service_data": {"entity_id": "light.hall"}},
    )
    assert m.map_event(call) is None


# --- other events --------------------------------------------------------------------------------
def test_call_service_tags_one_entity_only() -> None:
    m = mapper()
    for target, tagged in [
        ("light.a", "light.a"),
        (["light.a"], "light.a"),
        (["light.a", "light.b"], None),
        ("light.a, light.b", None),
    ]:
        data = {"domain": "light", "service": "turn_on", "service_data": {"entity_id": target}}
        point = mapped(m, event("call_service", data))
        assert point.measurement == "ha_event"
        assert point.time_ns == T1_NS
        assert point.tags["event_type"] == "call_service"
        assert point.tags["domain"] == "light"
        assert point.tags["service"] == "turn_on"
        assert point.tags["origin"] == "LOCAL"
        assert point.tags["instance"] == "home"
        assert point.tags.get("entity_id") == tagged
        assert json.loads(str(point.fields["data"])) == data
        assert point.fields["context_id"] == CONTEXT["id"]


def test_automation_and_script_events_carry_name_and_entity() -> None:
    m = mapper()
    automation = mapped(
        m,
        event(
            "automation_triggered",
            {"name": "Lights on", "entity_id": "automation.lights_on", "source": "state of x"},
        ),
    )
    assert automation.tags["entity_id"] == "automation.lights_on"
    assert automation.fields["name"] == "Lights on"
    script = mapped(m, event("script_started", {"name": "Bump", "entity_id": "script.bump"}))
    assert script.tags["entity_id"] == "script.bump"
    assert script.fields["name"] == "Bump"


def test_event_data_is_stored_losslessly() -> None:
    data = {
        "nested": {"list": [1, 2.5, None, True], "text": 'quote " and \\ and\nnewline'},
        "unicode": "Küche ☕",
        "big": 2**63 - 1,
        "float": 0.1,
    }
    point = mapped(mapper(), event("my_custom_event", data))
    assert json.loads(str(point.fields["data"])) == data
    assert "domain" not in point.tags
    encode_point(point)


def test_excluded_event_types_are_left_out() -> None:
    m = mapper(exclude_event_types=frozenset({"call_service"}))
    assert m.map_event(event("call_service", {"domain": "a", "service": "b"})) is None
    assert m.map_event(event("component_loaded", {"component": "x"})) is not None


# --- history rows (back-fill) --------------------------------------------------------------------
def history_row(
    value: str, attributes: dict[str, Any], last_updated: str, last_changed: str | None = None
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "s": value,
        "a": attributes,
        "lu": datetime.fromisoformat(last_updated).timestamp(),
    }
    if last_changed is not None and last_changed != last_updated:
        row["lc"] = datetime.fromisoformat(last_changed).timestamp()
    return row


def without_context(point: Point) -> Point:
    fields = {k: v for k, v in point.fields.items() if not k.startswith("context_")}
    return Point(point.measurement, point.tags, fields, point.time_ns)


@pytest.mark.parametrize(
    ("last_updated", "last_changed"),
    [
        (T1, T1),
        (T1, T0),  # attributes changed, state did not
        ("2024-03-15T10:21:00.999999+00:00", "2024-03-15T10:20:59.000007+00:00"),
    ],
)
def test_a_history_row_is_the_same_point_as_the_live_event(
    last_updated: str, last_changed: str
) -> None:
    info = EntityInfo(area="Hall", platform="template")
    m = mapper(entity_info=lambda entity_id: info)
    attributes = {"unit_of_measurement": "W", "device_class": "power", "level": 3}
    old = state("sensor.p", "10", attributes, last_updated=T0)
    new = state("sensor.p", "12.5", attributes, last_updated, last_changed)
    live = mapped(m, state_changed("sensor.p", new, old, fired=last_updated))
    rows = [
        history_row("10", attributes, T0),
        history_row("12.5", attributes, last_updated, last_changed),
    ]
    backfilled = list(history_points(m, "sensor.p", rows, start_ns=parse_time_ns(T0)))
    assert backfilled == [without_context(live)]
    assert encode_point(backfilled[0]) == encode_point(without_context(live))


def test_a_history_removal_row_is_the_same_point_as_the_live_removal() -> None:
    m = mapper()
    old = state("sensor.gone", "5", {"unit_of_measurement": "W"}, last_updated=T0)
    live = mapped(m, state_changed("sensor.gone", None, old, fired=T1))
    rows = [history_row("5", {"unit_of_measurement": "W"}, T0), history_row("", {}, T1)]
    backfilled = list(history_points(m, "sensor.gone", rows, start_ns=parse_time_ns(T0)))
    assert backfilled == [without_context(live)]


def test_the_synthetic_start_row_is_skipped_but_a_change_a_microsecond_later_is_not() -> None:
    m = full_mapper()
    start = "2024-03-15T10:00:00.000000+00:00"
    just_after = "2024-03-15T10:00:00.000001+00:00"
    rows = [history_row("1", {}, start), history_row("2", {}, just_after)]
    points = list(history_points(m, "sensor.x", rows, start_ns=parse_time_ns(start)))
    assert [p.fields["state"] for p in points] == ["2"]
    assert points[0].fields["previous_state"] == "1"
    assert points[0].time_ns == parse_time_ns(just_after)
    # without a start row (the entity appeared during the gap) every row is a change
    points = list(history_points(m, "sensor.x", rows[1:], start_ns=parse_time_ns(start)))
    assert [p.fields["state"] for p in points] == ["2"]
    assert "previous_state" not in points[0].fields


def test_a_row_after_a_removal_has_no_previous_state_like_a_live_re_add() -> None:
    m = mapper()
    rows = [history_row("", {}, T0), history_row("3", {}, T1)]
    points = list(history_points(m, "sensor.back", rows, start_ns=parse_time_ns(T0) - 1000))
    assert [p.fields.get("removed") for p in points] == [True, None]
    assert "previous_state" not in points[1].fields
