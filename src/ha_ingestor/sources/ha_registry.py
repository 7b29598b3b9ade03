"""Entity, device and area registries: where an entity is, what device it belongs to, which
integration made it. Loaded on connect, refreshed when ``*_registry_updated`` events say so."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ha_ingestor.pipeline.ha_events import EntityInfo

Call = Callable[[str], Awaitable[Any]]

REGISTRY_EVENTS = {
    "entity_registry_updated": "entity",
    "device_registry_updated": "device",
    "area_registry_updated": "area",
}


class Registries:
    def __init__(self) -> None:
        self._entities: dict[str, dict[str, Any]] = {}
        self._devices: dict[str, dict[str, Any]] = {}
        self._areas: dict[str, str] = {}
        self._info: dict[str, EntityInfo] = {}

    async def load(self, call: Call, which: str = "all") -> None:
        if which in ("all", "area"):
            areas = await call("config/area_registry/list")
            self._areas = {a["area_id"]: a.get("name") or a["area_id"] for a in areas or []}
        if which in ("all", "device"):
            devices = await call("config/device_registry/list")
            self._devices = {d["id"]: d for d in devices or []}
        if which in ("all", "entity"):
            entities = await call("config/entity_registry/list")
            self._entities = {e["entity_id"]: e for e in entities or []}
        self._info.clear()

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
        area_id = entry.get("area_id") or (device or {}).get("area_id")
        device_name = None
        if device is not None:
            device_name = device.get("name_by_user") or device.get("name")
        return EntityInfo(
            area=self._areas.get(area_id) if area_id else None,
            device=device_name,
            platform=entry.get("platform"),
        )
