"""Home Assistant MQTT discovery: which entity a state or attributes topic belongs to.

Discovery configs are retained messages on ``<prefix>/<component>/[<node_id>/]<object_id>/config``
(or device-based ``<prefix>/device/<id>/config`` with ``cmps``). Keys may be abbreviated
(``stat_t``), and ``~`` in a ``*_topic`` value stands for the base topic. An empty payload removes
the config. The entity id is the one Home Assistant derives for a new entity: ``default_entity_id``
or ``object_id`` when given, else the slugified device and entity names — a user who renames the
entity in Home Assistant later is not seen here (the WebSocket source knows the current name).
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import orjson

# Abbreviations of the keys this module reads (Home Assistant's MQTT abbreviation table).
_ABBREVIATIONS = {
    "stat_t": "state_topic",
    "json_attr_t": "json_attributes_topic",
    "obj_id": "object_id",
    "def_ent_id": "default_entity_id",
    "uniq_id": "unique_id",
    "dev": "device",
    "cmps": "components",
    "p": "platform",
}
_DEVICE_ABBREVIATIONS = {"name": "name", "ids": "identifiers"}
_TOPIC_KEYS = ("state_topic", "json_attributes_topic")
_SLUG_RE = re.compile(r"[^a-z0-9_]+")


@dataclass(frozen=True, slots=True)
class DiscoveredEntity:
    entity_id: str
    device: str | None


def slugify(text: str) -> str:
    """Lower-case ASCII words joined by ``_`` (close to Home Assistant's own slugify)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = _SLUG_RE.sub("_", ascii_text.lower()).strip("_")
    return re.sub("_+", "_", slug) or "unknown"


def _expand(config: dict[str, Any]) -> dict[str, Any]:
    expanded = {_ABBREVIATIONS.get(k, k): v for k, v in config.items()}
    base = expanded.get("~")
    if isinstance(base, str):
        for key in _TOPIC_KEYS:
            value = expanded.get(key)
            if isinstance(value, str):
                if value.startswith("~"):
                    value = base + value[1:]
                elif value.endswith("~"):
                    value = value[:-1] + base
                expanded[key] = value
    return expanded


def _entity_id(component: str, object_id: str, config: dict[str, Any], device: str | None) -> str:
    default = config.get("default_entity_id")
    if isinstance(default, str) and "." in default:
        return default
    if isinstance(config.get("object_id"), str):
        return f"{component}.{slugify(config['object_id'])}"
    name = config.get("name")
    if isinstance(name, str) and name:
        if device and not name.lower().startswith(device.lower()):
            return f"{component}.{slugify(device + ' ' + name)}"
        return f"{component}.{slugify(name)}"
    if device:
        return f"{component}.{slugify(device)}"
    return f"{component}.{slugify(object_id)}"


class DiscoveryMap:
    """Topic → entity mapping, updated from discovery config messages."""

    def __init__(self, prefix: str = "homeassistant") -> None:
        self._prefix = prefix.rstrip("/")
        self._prefix_slash = self._prefix + "/"
        # config topic → the (topic, entity) pairs it declared
        self._declared: dict[str, list[tuple[str, DiscoveredEntity]]] = {}
        self._by_topic: dict[str, list[DiscoveredEntity]] = defaultdict(list)

    def is_config_topic(self, topic: str) -> bool:
        return topic.startswith(self._prefix_slash) and topic.endswith("/config")

    def lookup(self, topic: str) -> tuple[str | None, str | None]:
        """(entity_id, device) for a topic: the entity when exactly one maps to it, else the
        device name when several entities of one device share it (zigbee2mqtt), else None."""
        entities = self._by_topic.get(topic)
        if not entities:
            return None, None
        if len(entities) == 1:
            return entities[0].entity_id, entities[0].device
        devices = {e.device for e in entities}
        return None, devices.pop() if len(devices) == 1 else None

    def update(self, topic: str, payload: bytes) -> bool:
        """Apply a config message; returns True when the mapping changed. Raises ValueError for a
        config that is not a JSON object (TypeError) or not JSON at all (ValueError)."""
        parts = topic[len(self._prefix_slash) :].split("/")
        if len(parts) not in (3, 4):
            return False
        component, object_id = parts[0], parts[-2]
        old = self._declared.pop(topic, [])
        for declared_topic, entity in old:
            entities = self._by_topic.get(declared_topic, [])
            if entity in entities:
                entities.remove(entity)
            if not entities:
                self._by_topic.pop(declared_topic, None)
        if not payload.strip():
            return bool(old)  # removal
        config = orjson.loads(payload)
        if not isinstance(config, dict):
            raise TypeError("discovery config is not a JSON object")
        config = _expand(config)
        declared: list[tuple[str, DiscoveredEntity]] = []
        if component == "device":
            components = config.get("components")
            device = _device_name(config)
            if isinstance(components, dict):
                shared = {k: v for k, v in config.items() if k != "components"}
                for cmp_id, cmp in components.items():
                    if isinstance(cmp, dict):
                        cmp_config = _expand({**shared, **cmp})
                        platform = cmp_config.get("platform")
                        if isinstance(platform, str):
                            declared += _declare(platform, str(cmp_id), cmp_config, device)
        else:
            declared = _declare(component, object_id, config, _device_name(config))
        for declared_topic, entity in declared:
            self._by_topic[declared_topic].append(entity)
        self._declared[topic] = declared
        return bool(old) or bool(declared)


def _device_name(config: dict[str, Any]) -> str | None:
    device = config.get("device")
    if isinstance(device, dict):
        name = device.get("name_by_user") or device.get("name")
        if isinstance(name, str) and name:
            return name
    return None


def _declare(
    component: str, object_id: str, config: dict[str, Any], device: str | None
) -> list[tuple[str, DiscoveredEntity]]:
    entity = DiscoveredEntity(_entity_id(component, object_id, config, device), device)
    topics = {config.get(key) for key in _TOPIC_KEYS}
    return [(t, entity) for t in topics if isinstance(t, str) and t]
