"""The Home Assistant source's own bookkeeping, without a Home Assistant: registries, shutdown drains
what was read, bad events are counted, the checkpoint waits for the back-fill."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from ha_ingestor.config import load_settings
from ha_ingestor.pipeline.buffer import MemoryCheckpoints
from ha_ingestor.pipeline.ha_events import EntityInfo, format_time_ns, parse_time_ns
from ha_ingestor.sinks.dead_letter import DeadLetterFile
from ha_ingestor.sources.ha_client import CommandError
from ha_ingestor.sources.ha_registry import Registries
from ha_ingestor.sources.homeassistant import CHECKPOINT_KEY, HomeAssistantSource
from ha_ingestor.telemetry import Telemetry
from tests.homeassistant.harness import RecordingBuffer
from tests.support.servers import free_port
from tests.support.waiting import wait_for

T1 = "2024-03-15T10:21:00.000001+00:00"


def state_changed(entity_id: str, value: str, fired: str = T1) -> dict[str, Any]:
    new = {
        "entity_id": entity_id,
        "state": value,
        "attributes": {},
        "last_changed": fired,
        "last_updated": fired,
        "context": {"id": "c1"},
    }
    return {
        "event_type": "state_changed",
        "data": {"entity_id": entity_id, "new_state": new, "old_state": None},
        "origin": "LOCAL",
        "time_fired": fired,
        "context": {"id": "c1"},
    }


@contextlib.asynccontextmanager
async def offline_source(
    buffer: RecordingBuffer,
    checkpoints: MemoryCheckpoints | None = None,
    dead_letters: DeadLetterFile | None = None,
    **settings: str,
) -> AsyncIterator[tuple[HomeAssistantSource, CollectorRegistry]]:
    env = {
        "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:9",
        "HA_INGESTOR_HA_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens
        "HA_INGESTOR_HA_TOKEN": "unused",
    } | {f"HA_INGESTOR_{k.upper()}": v for k, v in settings.items()}
    registry = CollectorRegistry()
    source = HomeAssistantSource(
        load_settings(env),
        buffer,
        Telemetry(registry),
        checkpoints if checkpoints is not None else MemoryCheckpoints(),
        dead_letters=dead_letters,
    )
    yield source, registry


async def test_events_already_read_are_buffered_when_the_source_stops() -> None:
    buffer = RecordingBuffer(max_lines=1)  # full after one line: the processor waits for room
    async with offline_source(buffer) as (source, _):
        task = asyncio.create_task(source.run())
        source._events.extend(state_changed(f"sensor.s{i}", str(i)) for i in range(4))
        source._events_ready.set()
        await wait_for(lambda: len(buffer.lines) == 1)
        await asyncio.sleep(0.1)
        assert len(buffer.lines) == 1, "the processor waits while the buffer is full"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(buffer.lines) == 4, "shutdown buffered the events that were read"


async def test_malformed_events_are_counted_and_kept_filtered_ones_counted(
    tmp_path: Path,
) -> None:
    buffer = RecordingBuffer()
    dead_letters = DeadLetterFile(tmp_path / "dead-letter.jsonl")
    malformed = {"event_type": "state_changed", "data": {"entity_id": "sensor.x"}}
    async with offline_source(
        buffer, dead_letters=dead_letters, ha_exclude_entities="sensor.hidden_*"
    ) as (source, registry):
        task = asyncio.create_task(source.run())
        source._events.extend(
            [malformed, state_changed("sensor.hidden_1", "1"), state_changed("sensor.shown", "1")]
        )
        source._events_ready.set()
        await wait_for(lambda: len(buffer.lines) == 1)
        task.cancel()  # the shutdown waits for the rejected event to be written
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(buffer.lines) == 1
    records = [json.loads(line) for line in dead_letters.path.read_text().splitlines()]
    assert [r["event"] for r in records] == [malformed], "kept as Home Assistant sent it"
    assert records[0]["reason"].startswith("malformed event: KeyError")

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    dropped = "ha_ingestor_events_dropped_total"
    assert sample(dropped, reason="malformed_event", intentional="false") == 1
    assert sample(dropped, reason="filtered_event", intentional="true") == 1
    assert (
        sample("ha_ingestor_invalid_input_total", source="homeassistant", reason="malformed_event")
        == 1
    )


async def test_the_checkpoint_stays_at_a_gap_until_its_back_fill_is_durable() -> None:
    gap_start = "2024-03-15T10:00:00.000000+00:00"
    checkpoints = MemoryCheckpoints()
    await checkpoints.save(CHECKPOINT_KEY, gap_start)
    buffer = RecordingBuffer()
    async with offline_source(buffer, checkpoints) as (source, _):
        assert source.checkpoint() == gap_start
        source._handle(state_changed("sensor.live", "1", fired=T1))
        await asyncio.sleep(0.01)  # the group is sealed: durable in memory
        assert source.checkpoint() == gap_start, "live events do not move it past the gap"
        source._release_hold(parse_time_ns(gap_start))
        assert source.checkpoint() == format_time_ns(parse_time_ns(T1))


async def test_registries_resolve_area_device_and_platform() -> None:
    answers: dict[str, Any] = {
        "config/area_registry/list": [
            {"area_id": "kitchen", "name": "Kitchen"},
            {"area_id": "hall", "name": "Hall"},
        ],
        "config/device_registry/list": [
            {"id": "d1", "area_id": "kitchen", "name": "Plug", "name_by_user": "Coffee plug"},
            {"id": "d2", "area_id": None, "name": "Bridge", "name_by_user": None},
        ],
        "config/entity_registry/list": [
            {"entity_id": "switch.coffee", "platform": "zha", "device_id": "d1", "area_id": None},
            {"entity_id": "sensor.hall_t", "platform": "zha", "device_id": "d1", "area_id": "hall"},
            {"entity_id": "sensor.bridge", "platform": "hue", "device_id": "d2", "area_id": None},
        ],
    }

    async def call(command: str) -> Any:
        if command not in answers:  # floors and labels: Home Assistant before 2024.4
            raise CommandError(command, "unknown_command", "Unknown command.")
        return answers[command]

    registries = Registries()
    await registries.load(call)
    assert registries.info("switch.coffee") == EntityInfo("Kitchen", "Coffee plug", "zha")
    assert registries.info("sensor.hall_t").area == "Hall", "the entity's own area wins"
    assert registries.info("sensor.bridge") == EntityInfo(None, "Bridge", "hue")
    assert registries.info("sensor.unknown") == EntityInfo()

    answers["config/area_registry/list"][0]["name"] = "Scullery"
    await registries.load(call, "area")
    assert registries.info("switch.coffee").area == "Scullery", "answers are not kept stale"


async def test_registries_give_floors_labels_child_device_areas_and_mqtt_entity_ids() -> None:
    answers: dict[str, Any] = {
        "config/area_registry/list": [
            {"area_id": "kitchen", "name": "Kitchen", "floor_id": "ground"},
            {"area_id": "attic", "name": "Attic", "floor_id": None},
        ],
        "config/floor_registry/list": [{"floor_id": "ground", "name": "Ground floor"}],
        "config/label_registry/list": [
            {"label_id": "energy", "name": "Energy"},
            {"label_id": "critical", "name": "Critical"},
        ],
        "config/device_registry/list": [
            {"id": "hub", "area_id": "kitchen", "name": "Hub", "parent_device_id": None},
            {"id": "child", "area_id": None, "name": "Child", "parent_device_id": "hub"},
            {"id": "loop", "area_id": None, "name": "Loop", "parent_device_id": "loop"},
        ],
        "config/entity_registry/list": [
            {
                "entity_id": "sensor.child_power",
                "platform": "mqtt",
                "unique_id": "child-power-1",
                "device_id": "child",
                "area_id": None,
                "labels": ["energy", "critical"],
            },
            {"entity_id": "sensor.looped", "platform": "x", "device_id": "loop", "area_id": None},
            {"entity_id": "sensor.up", "platform": "x", "device_id": None, "area_id": "attic"},
        ],
    }
    calls: list[str] = []

    async def call(command: str) -> Any:
        calls.append(command)
        return answers[command]

    changes: list[int] = []
    registries = Registries()
    registries.on_change(lambda: changes.append(1))
    await registries.load(call)
    child = registries.info("sensor.child_power")
    assert child == EntityInfo("Kitchen", "Child", "mqtt", "Ground floor", "Critical,Energy")
    assert registries.info("sensor.looped").area is None, "a parent loop ends"
    assert registries.info("sensor.up") == EntityInfo("Attic", None, "x")
    assert registries.mqtt_entity_id("sensor", "child-power-1") == "sensor.child_power"
    assert registries.mqtt_entity_id("switch", "child-power-1") is None, "per domain"
    assert changes == [1]

    answers["config/floor_registry/list"][0]["name"] = "Level 0"
    await registries.load(call, "floor")
    assert registries.info("sensor.child_power").floor == "Level 0"
    assert changes == [1], "only entity registry loads change MQTT names"
    answers["config/entity_registry/list"][0]["entity_id"] = "sensor.renamed"
    await registries.load(call, "entity")
    assert registries.mqtt_entity_id("sensor", "child-power-1") == "sensor.renamed"
    assert changes == [1, 1]
