"""MQTT discovery against a real Home Assistant: the entity id of every discovered state topic
equals what Home Assistant's entity registry holds — taken from the registry while the Home
Assistant source is on (renames followed), predicted when it is not. On the current release
child devices also show that a device without an area is where its parent is, on a floor."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import orjson
import pytest

from ha_ingestor.pipeline.mqtt_discovery import DiscoveryMap
from tests.homeassistant.harness import running_source
from tests.support.homeassistant import CURRENT, HomeAssistant
from tests.support.mqtt_publisher import Message, publish_many
from tests.support.servers import Mosquitto
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.homeassistant, pytest.mark.timeout(400)]

_runs = itertools.count()
ORIGIN = {"name": "ha-ingestor-tests"}
#: Shapes whose prediction by current rules the oldest release does not follow, and why.
OLDEST_DIFFERS = {
    "object_id": "object_id decides the entity id before 2026.4",
    "mixed_case": "default_entity_id is not known before 2025.10: the name decides",
    "wrong_domain": "default_entity_id is not known before 2025.10: the name decides",
    "abbreviations": "the area is not part of the entity id before 2026.x",
}
#: Device-based discovery (2024.11) and child devices (2026.11) are unknown to the oldest.
DEVICE_BASED = {"device_cmps_a", "device_cmps_b", "cdevs_parent", "cdevs_child"}


def shapes(tag: str) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, str]]:
    """(config topic, config) of each discovery shape, and the state topic of each unique id
    (the unique id names the shape)."""
    p = "homeassistant"
    configs: list[tuple[str, dict[str, Any]]] = [
        (
            f"{p}/device/{tag}_multi/config",
            {
                "dev": {"ids": [f"{tag}_multi"], "name": "Multi Meter"},
                "o": ORIGIN,
                "stat_t": f"{tag}/multi/state",  # shared: component a has none of its own
                "cmps": {
                    "a": {"p": "sensor", "name": "Alpha", "uniq_id": f"{tag}_device_cmps_a"},
                    "b": {
                        "p": "binary_sensor",
                        "name": "Beta",
                        "stat_t": f"{tag}/multi/beta",
                        "uniq_id": f"{tag}_device_cmps_b",
                    },
                },
            },
        ),
        (
            f"{p}/device/{tag}_hub/config",
            {
                "dev": {"ids": [f"{tag}_hub"], "name": "Hub"},
                "o": ORIGIN,
                "cmps": {
                    "t": {
                        "p": "sensor",
                        "name": "Hub temperature",
                        "stat_t": f"{tag}/hub/t",
                        "uniq_id": f"{tag}_cdevs_parent",
                    }
                },
                "cdevs": [
                    {
                        "ids": [f"{tag}_hub_kid"],
                        "name": "Kid",
                        "cmps": {
                            "k": {
                                "p": "sensor",
                                "name": "Kid temperature",
                                "stat_t": f"{tag}/hub/kid",
                                "uniq_id": f"{tag}_cdevs_child",
                            }
                        },
                    }
                ],
            },
        ),
        (
            f"{p}/sensor/{tag}_classic/config",
            {
                "name": "Classic Temp",
                "state_topic": f"{tag}/classic",
                "unique_id": f"{tag}_classic",
                "device": {"identifiers": [f"{tag}_d1"], "name": "Dev One"},
            },
        ),
        (
            f"{p}/sensor/{tag}/tilde/config",
            {"~": f"{tag}/tilde", "stat_t": "~/state", "name": "Tilde", "uniq_id": f"{tag}_tilde"},
        ),
        (
            f"{p}/sensor/{tag}_abbr/config",
            {
                "stat_t": f"{tag}/abbr",
                "uniq_id": f"{tag}_abbreviations",
                "dev": {"ids": [f"{tag}_d3"], "name": "Abbr Device", "sa": f"Hall {tag}"},
                "name": "Abbreviated",
            },
        ),
        (
            f"{p}/sensor/{tag}_objid/config",
            {
                "stat_t": f"{tag}/objid",
                "obj_id": f"custom_{tag}",
                "name": "With Object Id",
                "uniq_id": f"{tag}_object_id",
            },
        ),
        (
            f"{p}/sensor/{tag}_mixed/config",
            {
                "stat_t": f"{tag}/mixed",
                "def_ent_id": f"sensor.Mixed_Case_{tag.upper()}",
                "name": "Mixed",
                "uniq_id": f"{tag}_mixed_case",
            },
        ),
        (
            f"{p}/binary_sensor/{tag}_wrong/config",
            {
                "stat_t": f"{tag}/wrong",
                "default_entity_id": f"sensor.wrong_domain_{tag}",
                "name": "Wrong",
                "uniq_id": f"{tag}_wrong_domain",
            },
        ),
    ]
    state_topics = {
        f"{tag}_device_cmps_a": f"{tag}/multi/state",
        f"{tag}_device_cmps_b": f"{tag}/multi/beta",
        f"{tag}_cdevs_parent": f"{tag}/hub/t",
        f"{tag}_cdevs_child": f"{tag}/hub/kid",
        f"{tag}_classic": f"{tag}/classic",
        f"{tag}_tilde": f"{tag}/tilde/state",
        f"{tag}_abbreviations": f"{tag}/abbr",
        f"{tag}_object_id": f"{tag}/objid",
        f"{tag}_mixed_case": f"{tag}/mixed",
        f"{tag}_wrong_domain": f"{tag}/wrong",
    }
    return configs, state_topics


def discovery_map(configs: list[tuple[str, dict[str, Any]]], registry: Any = None) -> DiscoveryMap:
    discovery = DiscoveryMap(registry=registry)
    for topic, config in configs:
        discovery.update(topic, orjson.dumps(config))
    return discovery


async def mqtt_registry(ha: HomeAssistant) -> dict[str, dict[str, Any]]:
    async with ha.websocket() as ws:
        entries = await ws.call("config/entity_registry/list")
    return {e["unique_id"]: e for e in entries if e["platform"] == "mqtt"}


async def test_discovered_entity_ids_equal_home_assistants_registry(
    fresh_home_assistant: HomeAssistant, mosquitto: Mosquitto
) -> None:
    ha = fresh_home_assistant
    current = ha.release == CURRENT
    tag = f"d{next(_runs)}{int(time.time()) % 100000}"
    configs, state_topics = shapes(tag)
    await asyncio.to_thread(ha.add_mqtt, mosquitto.host, mosquitto.port)
    messages = [Message(t, orjson.dumps(c), qos=1, retain=True) for t, c in configs]
    await publish_many(mosquitto.host, mosquitto.port, messages, client_id=f"{tag}-pub")
    expected = {
        u: t
        for u, t in state_topics.items()
        if current or u.removeprefix(f"{tag}_") not in DEVICE_BASED
    }
    try:
        registry: dict[str, dict[str, Any]] = {}

        async def all_registered() -> bool:
            nonlocal registry
            registry = await mqtt_registry(ha)
            return set(expected) <= set(registry)

        await wait_for(all_registered, timeout=60, interval=0.5, message="discovered entities")
        # Device-based configs were published first: unknown to the oldest release, not late.
        assert set(registry) == set(expected)
        truth = {state_topics[u]: registry[u]["entity_id"] for u in expected}

        # The Home Assistant source on: the registry's entity ids.
        async with running_source(ha) as run:
            await run.wait_connected()
            from_registry = discovery_map(configs, run.source.registries)
            assert {t: from_registry.lookup(t)[0] for t in truth} == truth

            # A rename by the user is followed.
            renamed = f"sensor.renamed_{tag}"
            async with ha.websocket() as ws:
                await ws.call(
                    "config/entity_registry/update",
                    entity_id=truth[f"{tag}/classic"],
                    new_entity_id=renamed,
                )
            await wait_for(lambda: from_registry.lookup(f"{tag}/classic")[0] == renamed)

        # Home Assistant unreachable: predicted by current rules.
        predicted = discovery_map(configs)
        guesses = {t: predicted.lookup(t)[0] for t in truth}
        if current:
            assert guesses == truth
        else:
            differing = {
                u.removeprefix(f"{tag}_")
                for u in expected
                if guesses[state_topics[u]] != truth[state_topics[u]]
            }
            assert differing == set(OLDEST_DIFFERS), truth
    finally:
        cleared = [Message(t, b"", qos=1, retain=True) for t, _ in configs]
        await publish_many(mosquitto.host, mosquitto.port, cleared, client_id=f"{tag}-clear")


async def test_a_child_device_is_in_its_parents_area_and_the_area_on_its_floor(
    fresh_home_assistant: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """On the oldest release (no child devices, no floors) a plain device's area is used and
    no point has a floor."""
    ha = fresh_home_assistant
    current = ha.release == CURRENT
    tag = f"f{next(_runs)}{int(time.time()) % 100000}"
    configs, state_topics = shapes(tag)
    await asyncio.to_thread(ha.add_mqtt, mosquitto.host, mosquitto.port)
    messages = [Message(t, orjson.dumps(c), qos=1, retain=True) for t, c in configs]
    await publish_many(mosquitto.host, mosquitto.port, messages, client_id=f"{tag}-pub")
    entity_unique_id = f"{tag}_cdevs_child" if current else f"{tag}_classic"
    try:
        registry: dict[str, dict[str, Any]] = {}

        async def registered() -> bool:
            nonlocal registry
            registry = await mqtt_registry(ha)
            return entity_unique_id in registry

        await wait_for(registered, timeout=60, interval=0.5, message="discovered entity")
        entry = registry[entity_unique_id]
        async with ha.websocket() as ws:
            devices = {d["id"]: d for d in await ws.call("config/device_registry/list")}
            device = devices[entry["device_id"]]
            owner = device
            floor_name = f"Floor {tag}"
            area_options: dict[str, Any] = {"name": f"Area {tag}"}
            if current:
                assert device["area_id"] is None
                owner = devices[device["parent_device_id"]]  # the area goes to the parent
                floor = await ws.call("config/floor_registry/create", name=floor_name)
                area_options["floor_id"] = floor["floor_id"]
            area = await ws.call("config/area_registry/create", **area_options)
            await ws.call(
                "config/device_registry/update", device_id=owner["id"], area_id=area["area_id"]
            )

        async with running_source(ha) as run:
            await run.wait_connected()
            entity_id = entry["entity_id"]
            since = time.time()
            values = itertools.count(20)

            async def state_stored() -> bool:
                if any(x.tags["entity_id"] == entity_id for x in run.states(since)):
                    return True
                # Until Home Assistant's (debounced) subscription to the topic is active.
                value = str(next(values)).encode()
                state = [Message(state_topics[entity_unique_id], value, qos=1)]
                await publish_many(mosquitto.host, mosquitto.port, state, client_id=f"{tag}-s")
                return False

            await wait_for(state_stored, interval=1.0, message="the entity's state point")
            point = next(x for x in run.states(since) if x.tags["entity_id"] == entity_id)
        assert point.tags["area"] == f"Area {tag}"
        assert point.tags["platform"] == "mqtt"
        if current:
            assert point.tags["floor"] == floor_name
            assert point.tags["device"] == "Kid"
        else:
            assert "floor" not in point.tags
    finally:
        cleared = [Message(t, b"", qos=1, retain=True) for t, _ in configs]
        await publish_many(mosquitto.host, mosquitto.port, cleared, client_id=f"{tag}-clear")
