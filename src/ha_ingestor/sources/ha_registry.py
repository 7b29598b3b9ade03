"""Home Assistant's registries: where an entity is (area, floor), what device it belongs to,
which integration made it, its labels — and the ``entity_id`` of each MQTT-discovered entity.

Loaded on connect, refreshed when ``*_registry_updated`` events say so. Floors and labels came
with Home Assistant 2024.4: an older one answers ``unknown_command`` and they stay empty. A child
device (``parent_device_id``, 2026.9) without an area of its own is where its parent is.

:class:`Registries` is also the MQTT side's view of Home Assistant
(:class:`~ha_ingestor.pipeline.mqtt_discovery.MqttEntityRegistry`): the registry entry of
platform ``mqtt`` with a discovery config's ``unique_id`` names its entity, renames included.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ha_ingestor.pipeline.ha_events import EntityInfo
from ha_ingestor.sources.ha_client import CommandError

Call = Callable[[str], Awaitable[Any]]

REGISTRY_EVENTS = {
    "entity_registry_updated": "entity",
    "device_registry_updated": "device",
    "area_registry_updated": "area",
    "floor_registry_updated": "floor",
    "label_registry_updated": "label",
    # Categories are not stored; an entity's change of category is an entity registry event.
    "category_registry_updated": "entity",
}
_COMMANDS = {
    "area": "config/area_registry/list",
    "floor": "config/floor_registry/list",
    "label": "config/label_registry/list",
    "device": "config/device_registry/list",
    "entity": "config/entity_registry/list",
}
_OPTIONAL = frozenset({"floor", "label"})  # absent before Home Assistant 2024.4
_MAX_PARENT_HOPS = 8  # a parent chain longer than this is treated as a loop


class Registries:
    def __init__(self) -> None:
        self._entities: dict[str, dict[str, Any]] = {}
        self._devices: dict[str, dict[str, Any]] = {}
        self._areas: dict[str, dict[str, Any]] = {}
        self._floors: dict[str, str] = {}
        self._labels: dict[str, str] = {}
        self._mqtt: dict[tuple[str, str], str] = {}  # (domain, unique_id) → entity_id
        self._info: dict[str, EntityInfo] = {}
        self._listeners: list[Callable[[], None]] = []

    async def load(self, call: Call, which: str = "all") -> None:
        names = list(_COMMANDS) if which == "all" else [which]
        for name in names:
            try:
                answer = await call(_COMMANDS[name])
            except CommandError as exc:
                if name in _OPTIONAL and exc.code == "unknown_command":
                    answer = []
                else:
                    raise
            self._store(name, answer or [])
        self._info.clear()
        if "entity" in names:
            for listener in list(self._listeners):
                listener()

    def _store(self, name: str, entries: list[dict[str, Any]]) -> None:
        if name == "area":
            self._areas = {a["area_id"]: a for a in entries}
        elif name == "floor":
            self._floors = {f["floor_id"]: f.get("name") or f["floor_id"] for f in entries}
        elif name == "label":
            self._labels = {x["label_id"]: x.get("name") or x["label_id"] for x in entries}
        elif name == "device":
            self._devices = {d["id"]: d for d in entries}
        else:
            self._entities = {e["entity_id"]: e for e in entries}
            self._mqtt = {
                (e["entity_id"].partition(".")[0], str(e["unique_id"])): e["entity_id"]
                for e in entries
                if e.get("platform") == "mqtt" and e.get("unique_id") is not None
            }

    # --- the HA source's view ----------------------------------------------------------------------
    def info(self, entity_id: str) -> EntityInfo:
        info = self._info.get(entity_id)
        if info is None:
            info = self._info[entity_id] = self._resolve(entity_id)
        return info

    def _resolve(self, entity_id: str) -> EntityInfo:
        entry = self._entities.get(entity_id)
        if entry is None:
            return EntityInfo()
        device = self._devices.get(entry.get("device_id") or "")
        area_id = entry.get("area_id") or self._device_area(device)
        area = self._areas.get(area_id) if area_id else None
        floor_id = (area or {}).get("floor_id")
        device_name = None
        if device is not None:
            device_name = device.get("name_by_user") or device.get("name")
        labels = sorted(self._labels.get(x, x) for x in entry.get("labels") or ())
        return EntityInfo(
            area=(area.get("name") or area_id) if area and area_id else None,
            device=device_name,
            platform=entry.get("platform"),
            floor=self._floors.get(floor_id) if floor_id else None,
            labels=",".join(labels) if labels else None,
        )

    def _device_area(self, device: dict[str, Any] | None) -> str | None:
        """The device's area, else the nearest parent device's (child devices)."""
        for _ in range(_MAX_PARENT_HOPS):
            if device is None:
                return None
            if device.get("area_id"):
                return str(device["area_id"])
            device = self._devices.get(device.get("parent_device_id") or "")
        return None

    # --- the MQTT side's view ----------------------------------------------------------------------
    def mqtt_entity_id(self, domain: str, unique_id: str) -> str | None:
        return self._mqtt.get((domain, unique_id))

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every (re)load of the entity registry."""
        self._listeners.append(listener)
