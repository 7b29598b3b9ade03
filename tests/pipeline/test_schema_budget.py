"""The lean ``ha_state`` rules (what is stored only when it carries information) and the column
budgets that keep every measurement inside InfluxDB 3 Core's 500 columns."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ha_ingestor.pipeline import columns as columns_module
from ha_ingestor.pipeline.buffer import MemoryCheckpoints
from ha_ingestor.pipeline.columns import ColumnBudget, ColumnBudgets, promoted_budget
from ha_ingestor.pipeline.ha_backfill import history_points
from ha_ingestor.pipeline.ha_events import (
    MAX_STRING_BYTES,
    OPTIONAL_STATE_FIELDS,
    Mapper,
    parse_time_ns,
)
from ha_ingestor.pipeline.mqtt_discovery import DiscoveryMap
from ha_ingestor.pipeline.mqtt_messages import MqttMessageEncoder
from ha_ingestor.pipeline.spool import SqliteSpool, read_checkpoint
from ha_ingestor.telemetry import Telemetry
from tests.sinks.conftest import RecordingLogger, new_telemetry, sample
from tests.support.waiting import wait_for

TIMES = [f"2024-03-15T10:0{i}:00.000001+00:00" for i in range(5)]
ATTRS = {"friendly_name": "Power", "unit_of_measurement": "W", "battery": 80}


def live_state(
    value: str, when: str, attributes: dict[str, Any], changed: str | None = None
) -> dict[str, Any]:
    return {
        "entity_id": "sensor.p",
        "state": value,
        "attributes": attributes,
        "last_changed": changed or when,
        "last_updated": when,
        "context": {"id": f"ctx-{when}", "parent_id": None, "user_id": None},
    }


def state_changed(
    new: dict[str, Any], old: dict[str, Any] | None, context_id: str = ""
) -> dict[str, Any]:
    context = {"id": context_id or new["context"]["id"], "parent_id": None, "user_id": None}
    new = {**new, "context": context}
    return {
        "event_type": "state_changed",
        "data": {"entity_id": "sensor.p", "new_state": new, "old_state": old},
        "origin": "LOCAL",
        "time_fired": new["last_updated"],
        "context": context,
    }


def history_row(
    value: str, when: str, attributes: dict[str, Any], changed: str | None = None
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "s": value,
        "a": attributes,
        "lu": datetime.fromisoformat(when).timestamp(),
    }
    if changed is not None and changed != when:
        row["lc"] = datetime.fromisoformat(changed).timestamp()
    return row


# (state, attributes, last_changed) per step: attributes change at step 2, state stays at 3.
STEPS = [
    ("1", ATTRS, None),
    ("2", ATTRS, None),
    ("3", {**ATTRS, "battery": 79}, None),
    ("3", {**ATTRS, "battery": 78}, TIMES[2]),
    ("4", {**ATTRS, "battery": 78}, None),
]


def live_points(m: Mapper) -> list[dict[str, Any]]:
    points, old = [], None
    for (value, attributes, changed), when in zip(STEPS, TIMES, strict=True):
        new = live_state(value, when, attributes, changed)
        point = m.map_event(state_changed(new, old))
        assert point is not None
        points.append(point.fields)
        old = new
    return points


@pytest.mark.timeout(30)
def test_attributes_and_last_changed_only_when_they_carry_information() -> None:
    fields = live_points(Mapper(instance="home"))
    assert ["attributes" in f for f in fields] == [True, False, True, True, False]
    assert ["last_changed" in f for f in fields] == [False, False, False, True, False]
    assert all("previous_state" not in f for f in fields)
    assert all(f["attr_battery"] for f in fields), "numeric attributes on every point"
    assert all("state" in f and "value" in f for f in fields)
    assert all("context_id" not in f for f in fields), "no other stored event shares them"


@pytest.mark.timeout(30)
def test_a_back_filled_state_is_the_same_point_as_the_live_one() -> None:
    m = Mapper(instance="home")
    live = live_points(m)
    rows = [
        history_row(value, when, attributes, changed)
        for (value, attributes, changed), when in zip(STEPS, TIMES, strict=True)
    ]
    start_ns = parse_time_ns(TIMES[0]) - 1000
    backfilled = [p.fields for p in history_points(m, "sensor.p", rows, start_ns=start_ns)]
    assert backfilled == live


@pytest.mark.timeout(30)
def test_every_optional_field_can_be_switched_back_on() -> None:
    fields = live_points(Mapper(instance="home", state_fields_always=OPTIONAL_STATE_FIELDS))
    assert all("attributes" in f and "last_changed" in f and "context_id" in f for f in fields)
    assert ["previous_state" in f for f in fields] == [False, True, True, True, True]


@pytest.mark.timeout(30)
def test_a_state_keeps_its_context_when_a_stored_event_shares_it() -> None:
    m = Mapper(instance="home")
    call = {
        "event_type": "call_service",
        "data": {"domain": "light", "service": "turn_on"},
        "origin": "LOCAL",
        "time_fired": TIMES[0],
        "context": {"id": "ctx-call", "parent_id": None, "user_id": None},
    }
    assert m.map_event(call) is not None
    caused = m.map_event(state_changed(live_state("on", TIMES[1], {}), None, "ctx-call"))
    unrelated = m.map_event(state_changed(live_state("off", TIMES[2], {}), None, "ctx-other"))
    assert caused is not None
    assert caused.fields["context_id"] == "ctx-call"
    assert unrelated is not None
    assert "context_id" not in unrelated.fields


@pytest.mark.timeout(30)
def test_attr_fields_past_the_budget_stay_in_the_attributes() -> None:
    telemetry, log = new_telemetry()
    m = Mapper(instance="home", columns=ColumnBudget("ha_state", 2, telemetry=telemetry))
    for i in range(3):
        attributes = {f"n{j}": j for j in range(i * 2, i * 2 + 2)}
        point = m.map_event(state_changed(live_state("1", TIMES[i], attributes), None))
        assert point is not None
        assert f'"n{i * 2}":{i * 2}' in str(point.fields["attributes"])
        promoted = sorted(k for k in point.fields if k.startswith("attr_"))
        assert promoted == (["attr_n0", "attr_n1"] if i == 0 else [])
    assert (
        sample(
            telemetry,
            "ha_ingestor_fields_left_out_total",
            measurement="ha_state",
            reason="column_budget",
        )
        == 4
    )
    assert (
        len(log.named("column budget reached: field not promoted, its value stays in the record"))
        == 4
    )


@pytest.mark.timeout(30)
def test_json_leaves_past_the_budget_stay_in_the_payload_and_are_logged_once() -> None:
    telemetry, log = new_telemetry()
    budget = ColumnBudget("mqtt_message", 3, telemetry=telemetry)
    encoder = MqttMessageEncoder(instance="home", static_tags={}, discovery=DiscoveryMap())
    encoder.limit_columns(budget)
    lines = [
        encoder.encode(f"z/{i}", f'{{"a{i}":1,"b{i}":2}}'.encode(), 0, False, i + 1)
        for i in range(4)
    ] + [encoder.encode("z/9", b'{"a3":5}', 0, False, 9)]
    assert "a3=" not in lines[3]
    assert '\\"a3\\":1' in lines[3], "the value is still in the payload"
    assert "a0=1.0,b0=2.0" in lines[0]
    assert "a1=1.0" in lines[1]
    assert "b1=" not in lines[1]
    assert budget.admitted == frozenset({"a0", "b0", "a1"})
    left_out = sample(
        telemetry,
        "ha_ingestor_fields_left_out_total",
        measurement="mqtt_message",
        reason="column_budget",
    )
    assert left_out == 6  # b1, a2, b2, a3, b3, and a3 again
    logged = [
        e["field"]
        for e in log.named(
            "column budget reached: field not promoted, its value stays in the record"
        )
    ]
    assert sorted(logged) == ["a2", "a3", "b1", "b2", "b3"]


@pytest.mark.timeout(30)
def test_a_leaf_named_like_a_tag_is_renamed() -> None:
    encoder = MqttMessageEncoder(
        instance="home", static_tags={"site": "lab"}, discovery=DiscoveryMap()
    )
    line = encoder.encode("t", b'{"topic":1,"device":2,"site":3,"instance":4,"ok":5}', 0, False, 1)
    for name in (
        "json.topic=1.0",
        "json.device=2.0",
        "json.site=3.0",
        "json.instance=4.0",
        "ok=5.0",
    ):
        assert name in line


@pytest.mark.timeout(30)
def test_budgets_leave_room_for_time_tags_and_own_fields() -> None:
    assert promoted_budget(500, 20, 2) == 478
    assert promoted_budget(0, 20, 2) is None
    assert promoted_budget(10, 20, 2) == 0


@pytest.mark.timeout(30)
async def test_admitted_names_survive_a_restart_in_the_spool_database(tmp_path: Path) -> None:
    telemetry = Telemetry(CollectorRegistry(), logger=RecordingLogger())

    def open_spool() -> SqliteSpool:
        return SqliteSpool(tmp_path / "spool", telemetry)

    async with open_spool() as spool:
        budgets = ColumnBudgets(spool, telemetry)
        budget = budgets.budget("mqtt_message", 2)
        assert budget.admit("a")
        assert budget.admit("b")
        await budgets.save()
        await spool.flush()
    async with open_spool() as spool:
        again = ColumnBudgets(spool, telemetry).budget("mqtt_message", 2)
        assert again.admitted == frozenset({"a", "b"})
        assert not again.admit("c")
    memory = ColumnBudgets(MemoryCheckpoints())
    assert memory.budget("ha_state", None).admit("attr_x")


@pytest.mark.timeout(30)
async def test_names_of_another_spool_count_against_the_budget(tmp_path: Path) -> None:
    """The service and ``ha-ingestor import`` write one table from two spools: each counts the
    other's names, read at the start and again on refresh, and saves only its own view."""
    telemetry, log = new_telemetry()
    service_dir, import_dir = tmp_path / "spool", tmp_path / "spool" / "import"
    async with SqliteSpool(service_dir, telemetry) as service_spool:
        service = ColumnBudgets(service_spool, telemetry)
        assert service.budget("ha_state", 4).admit("attr_a")
        await service.save()
        await service_spool.flush()
        async with SqliteSpool(import_dir, telemetry) as import_spool:
            imports = ColumnBudgets(
                import_spool, telemetry, [partial(read_checkpoint, service_dir)]
            )
            budget = imports.budget("ha_state", 4)
            assert budget.admitted == frozenset({"attr_a"})
            assert budget.admit("attr_b")
            # The service admits two more meanwhile; the import sees them on its next look.
            assert service.budget("ha_state", 4).admit("attr_c")
            assert service.budget("ha_state", 4).admit("attr_d")
            await service.save()
            await service_spool.flush()
            assert budget.admit("attr_e"), "not looked yet"
            imports.refresh()
            assert not budget.admit("attr_f")
            assert budget.admitted == frozenset({"attr_a", "attr_b", "attr_c", "attr_d", "attr_e"})
            await imports.save()
            await import_spool.flush()
        saved = read_checkpoint(import_dir, "columns.ha_state")
        assert saved is not None
        assert {"attr_a", "attr_b"} <= set(json.loads(saved))
    assert not log.named("column names of another spool not read")


@pytest.mark.timeout(30)
async def test_a_running_budget_looks_at_the_other_spool_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(columns_module, "SHARED_LOOK", 0.05)
    other = {"columns.ha_state": '["attr_a"]'}
    budgets = ColumnBudgets(MemoryCheckpoints(), None, [other.get])
    budget = budgets.budget("ha_state", 3)
    assert budget.admitted == frozenset({"attr_a"})
    running = asyncio.create_task(budgets.run(interval=0.01))
    try:
        other["columns.ha_state"] = '["attr_a", "attr_b", "attr_c"]'
        await wait_for(lambda: len(budget.admitted) == 3, timeout=5, message="the next look")
        assert not budget.admit("attr_d")
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


@pytest.mark.timeout(30)
async def test_an_unreadable_other_spool_is_logged_and_the_budget_goes_on(tmp_path: Path) -> None:
    telemetry, log = new_telemetry()
    async with SqliteSpool(tmp_path / "other", telemetry) as other:
        await other.save("columns.ha_state", '{"not": "a list"}')
        await other.flush()

    def broken(key: str) -> str | None:
        raise OSError(f"cannot read {key}: disk gone")

    budgets = ColumnBudgets(
        MemoryCheckpoints(), telemetry, [partial(read_checkpoint, tmp_path / "other"), broken]
    )
    budget = budgets.budget("ha_state", 1)
    assert budget.admit("attr_x")
    assert not budget.admit("attr_y")
    warnings = log.named("column names of another spool not read")
    assert [w["measurement"] for w in warnings] == ["ha_state", "ha_state"]
    assert "not a list" in warnings[0]["error"]
    assert "disk gone" in warnings[1]["error"]


@pytest.mark.timeout(30)
def test_json_over_the_servers_string_limit_is_cut_and_marked() -> None:
    m = Mapper(instance="home")
    huge = {"blob": "é" * MAX_STRING_BYTES}
    point = m.map_event(state_changed(live_state("1", TIMES[0], huge), None))
    assert point is not None
    text = str(point.fields["attributes"])
    assert len(text.encode()) <= MAX_STRING_BYTES
    assert text.startswith('{"blob":"éé')
    assert point.fields["truncated"] is True
    small = m.map_event(state_changed(live_state("2", TIMES[1], {"a": 1}), None))
    assert small is not None
    assert "truncated" not in small.fields
