"""Home Assistant MQTT discovery: which entity a state or attributes topic belongs to.

Discovery configs are retained messages on ``<prefix>/<component>/[<node_id>/]<object_id>/config``
or, device-based, ``<prefix>/device/[<node_id>/]<id>/config`` whose ``cmps`` (and the ``cmps``
of each child device in ``cdevs``) are the components. Keys may be abbreviated (``stat_t``),
``~`` in a ``*_topic`` value stands for the component's base topic, and a device-based config
passes only Home Assistant's shared options (:data:`SHARED_OPTIONS`) on to its components. An
empty payload removes the config.

The ``entity_id`` of a discovered entity is, in this order:

1. what Home Assistant's entity registry says for the config's ``unique_id`` (platform
   ``mqtt``), when the Home Assistant source is on (:class:`MqttEntityRegistry`) — so a user's
   rename is followed;
2. otherwise predicted by the rules of current Home Assistant (2026.11) for a new entity:
   ``object_id`` is ignored (since 2026.4); ``default_entity_id`` gives its object id,
   slugified, under the component's own domain; else the slugified name parts — area
   (the device's ``suggested_area``, a child device's parent's), parent device (for a child
   device without an area), device, entity (``name``; ``null`` for none; absent for the
   platform's default name) — joined by spaces. Home Assistant numbers a colliding id
   (``_2``); the prediction cannot know of those.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

#: Abbreviations of the keys read here (Home Assistant's MQTT abbreviation table).
_ABBREVIATIONS = {
    "stat_t": "state_topic",
    "json_attr_t": "json_attributes_topic",
    "cmd_t": "command_topic",
    "avty_t": "availability_topic",
    "avty": "availability",
    "avty_mode": "availability_mode",
    "avty_tpl": "availability_template",
    "pl_avail": "payload_available",
    "pl_not_avail": "payload_not_available",
    "e": "encoding",
    "ret": "retain",
    "obj_id": "object_id",
    "def_ent_id": "default_entity_id",
    "uniq_id": "unique_id",
    "dev": "device",
    "dev_cla": "device_class",
    "cmps": "components",
    "cdevs": "child_devices",
    "p": "platform",
    "o": "origin",
}
_DEVICE_ABBREVIATIONS = {"ids": "identifiers", "sa": "suggested_area", "cdev": "child_device"}
#: What a device-based config passes on to its components (when they do not set it).
SHARED_OPTIONS = (
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "command_topic",
    "encoding",
    "message_expiry_interval",
    "payload_available",
    "payload_not_available",
    "state_topic",
    "qos",
)
_TOPIC_KEYS = ("state_topic", "json_attributes_topic")
#: The name Home Assistant gives an MQTT entity whose config has no ``name`` key.
_DEFAULT_NAMES = {
    "alarm_control_panel": "MQTT Alarm",
    "binary_sensor": "MQTT Binary sensor",
    "button": "MQTT Button",
    "climate": "MQTT HVAC",
    "cover": "MQTT Cover",
    "event": "MQTT Event",
    "fan": "MQTT Fan",
    "humidifier": "MQTT Humidifier",
    "light": "MQTT LightEntity",
    "lock": "MQTT Lock",
    "number": "MQTT Number",
    "select": "MQTT Select",
    "sensor": "MQTT Sensor",
    "siren": "MQTT Siren",
    "switch": "MQTT Switch",
    "text": "MQTT Text",
    "update": "MQTT Update",
    "valve": "MQTT Valve",
}
_QUOTES_RE = re.compile(r"[\"'\u2018\u2019\u201c\u201d]")
_SLUG_RE = re.compile(r"[^a-z0-9]+")


class MqttEntityRegistry(Protocol):
    """Home Assistant's entity registry as the MQTT side needs it."""

    def mqtt_entity_id(self, domain: str, unique_id: str) -> str | None:
        """The entity id of the ``mqtt`` entity of ``domain`` with ``unique_id``, if known."""
        ...

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever those entity ids may have changed."""
        ...


@dataclass(frozen=True, slots=True)
class DiscoveredEntity:
    domain: str
    unique_id: str | None
    predicted_entity_id: str
    device: str | None


def slugify(text: str) -> str:
    """Home Assistant's slugify: quotes dropped, ASCII-folded, lower-case words joined by ``_``."""
    text = _QUOTES_RE.sub("", text)
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return _SLUG_RE.sub("_", ascii_text.lower()).strip("_") or "unknown"


def _abbreviated(config: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
    return {table.get(k, k): v for k, v in config.items()}


def _expand_device(device: Any) -> Any:
    if not isinstance(device, dict):
        return device
    device = _abbreviated(device, _DEVICE_ABBREVIATIONS)
    child = device.get("child_device")
    if isinstance(child, dict):
        device["child_device"] = _abbreviated(child, _DEVICE_ABBREVIATIONS)
    return device


def _expand(config: dict[str, Any]) -> dict[str, Any]:
    """Full keys for a config (its device, child devices and components included)."""
    expanded = _abbreviated(config, _ABBREVIATIONS)
    if "device" in expanded:
        expanded["device"] = _expand_device(expanded["device"])
    components = expanded.get("components")
    if isinstance(components, dict):
        expanded["components"] = {
            k: _abbreviated(v, _ABBREVIATIONS) if isinstance(v, dict) else v
            for k, v in components.items()
        }
    children = expanded.get("child_devices")
    if isinstance(children, list):
        expanded["child_devices"] = [
            _expand(_abbreviated(c, _DEVICE_ABBREVIATIONS)) if isinstance(c, dict) else c
            for c in children
        ]
    return expanded


def _with_topic_base(config: dict[str, Any]) -> dict[str, Any]:
    base = config.get("~")
    if not isinstance(base, str):
        return config
    config = dict(config)
    for key in _TOPIC_KEYS:
        value = config.get(key)
        if isinstance(value, str) and value:
            if value.startswith("~"):
                value = base + value[1:]
            if value.endswith("~"):
                value = value[:-1] + base
            config[key] = value
    return config


def _name(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def predict_entity_id(domain: str, config: dict[str, Any]) -> str:
    """The entity id current Home Assistant gives a new entity of this (expanded) config."""
    default = config.get("default_entity_id")
    if isinstance(default, str):
        object_id = default.partition(".")[2]
        if object_id:
            return f"{domain}.{slugify(object_id)}"
    device = _device(config)
    child = device.get("child_device")
    if isinstance(child, dict):
        # The entity belongs to the child device; it has no area of its own: its parent's.
        parts = [_name(device.get("suggested_area")), _name(device.get("name"))]
        parts.append(_name(child.get("name")))
    else:
        parts = [_name(device.get("suggested_area")), _name(device.get("name"))]
    if "name" in config:
        parts.append(_name(config["name"]))
    else:
        parts.append(_DEFAULT_NAMES.get(domain, f"MQTT {domain}"))
    full_name = " ".join(p for p in parts if p)
    if not full_name:
        return f"{domain}.mqtt_{slugify(str(config.get('unique_id', '')))}"
    return f"{domain}.{slugify(full_name)}"


def _device(config: dict[str, Any]) -> dict[str, Any]:
    device = config.get("device")
    return device if isinstance(device, dict) else {}


def _device_name(config: dict[str, Any]) -> str | None:
    """The name of the device the entity belongs to (a child device's own, if it is one)."""
    device = config.get("device")
    if not isinstance(device, dict):
        return None
    child = device.get("child_device")
    holder = child if isinstance(child, dict) else device
    return _name(holder.get("name_by_user")) or _name(holder.get("name"))


def _components(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(platform, config) of each component of a device-based config, as Home Assistant
    hands them on: the device (with ``child_device`` for a child's), shared options."""
    device = _device(config)
    groups: list[tuple[Any, dict[str, Any] | None]] = [(config.get("components"), None)]
    for child in config.get("child_devices") or ():
        if isinstance(child, dict):
            identity = {k: child[k] for k in ("identifiers", "name") if k in child}
            groups.append((child.get("components"), identity))
    found: list[tuple[str, dict[str, Any]]] = []
    for components, child_device in groups:
        if not isinstance(components, dict):
            continue
        for component in components.values():
            if not isinstance(component, dict):
                continue
            own = dict(component)
            platform = own.pop("platform", None)
            if not isinstance(platform, str) or not own:
                continue  # an empty component removes it
            own["device"] = (
                device if child_device is None else {**device, "child_device": child_device}
            )
            for option in SHARED_OPTIONS:
                if option in config and option not in own:
                    own[option] = config[option]
            found.append((platform, _with_topic_base(own)))
    return found


class DiscoveryMap:
    """Topic → entity mapping, updated from discovery config messages."""

    def __init__(
        self, prefix: str = "homeassistant", registry: MqttEntityRegistry | None = None
    ) -> None:
        self._prefix = prefix.rstrip("/")
        self._prefix_slash = self._prefix + "/"
        self._registry = registry
        # config topic → the (topic, entity) pairs it declared
        self._declared: dict[str, list[tuple[str, DiscoveredEntity]]] = {}
        self._by_topic: dict[str, list[DiscoveredEntity]] = defaultdict(list)

    def is_config_topic(self, topic: str) -> bool:
        return topic.startswith(self._prefix_slash) and topic.endswith("/config")

    def entity_id(self, entity: DiscoveredEntity) -> str:
        """The registry's entity id when it has one, else the prediction."""
        if self._registry is not None and entity.unique_id is not None:
            known = self._registry.mqtt_entity_id(entity.domain, entity.unique_id)
            if known:
                return known
        return entity.predicted_entity_id

    def lookup(self, topic: str) -> tuple[str | None, str | None]:
        """(entity_id, device) for a topic: the entity when exactly one maps to it, else the
        device name when several entities of one device share it (zigbee2mqtt), else None."""
        entities = self._by_topic.get(topic)
        if not entities:
            return None, None
        if len(entities) == 1:
            return self.entity_id(entities[0]), entities[0].device
        devices = {e.device for e in entities}
        return None, devices.pop() if len(devices) == 1 else None

    def update(self, topic: str, payload: bytes) -> bool:
        """Apply a config message; returns True when the mapping changed. Raises ValueError for a
        config that is not a JSON object (TypeError) or not JSON at all (ValueError)."""
        parts = topic[len(self._prefix_slash) :].split("/")
        if len(parts) not in (3, 4):
            return False
        component = parts[0]
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
        if component == "device":
            found = _components(config)
        else:
            found = [(component, _with_topic_base(config))]
        declared: list[tuple[str, DiscoveredEntity]] = []
        for domain, entity_config in found:
            declared += _declare(domain, entity_config)
        for declared_topic, entity in declared:
            self._by_topic[declared_topic].append(entity)
        self._declared[topic] = declared
        return bool(old) or bool(declared)


def _declare(domain: str, config: dict[str, Any]) -> list[tuple[str, DiscoveredEntity]]:
    unique_id = config.get("unique_id")
    entity = DiscoveredEntity(
        domain,
        str(unique_id) if unique_id is not None else None,
        predict_entity_id(domain, config),
        _device_name(config),
    )
    topics = {config.get(key) for key in _TOPIC_KEYS}
    return [(t, entity) for t in topics if isinstance(t, str) and t]
