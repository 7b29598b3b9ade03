"""Discovery configs → entity ids by current Home Assistant's rules (tests/homeassistant checks
the same shapes against a real Home Assistant's registry)."""

from collections.abc import Callable

import orjson

from ha_ingestor.pipeline.mqtt_discovery import DiscoveryMap, slugify


def _config(**config: object) -> bytes:
    return orjson.dumps(config)


def test_abbreviated_config_with_base_topic_maps_state_and_attribute_topics() -> None:
    discovery = DiscoveryMap()
    changed = discovery.update(
        "homeassistant/sensor/node1/temp/config",
        _config(
            **{
                "~": "home/livingroom",
                "stat_t": "~/state",
                "json_attr_t": "~/attrs",
                "obj_id": "living_temp",
                "name": "Temp",
            }
        ),
    )
    assert changed
    # object_id is ignored (Home Assistant 2026.4+): the name decides
    assert discovery.lookup("home/livingroom/state") == ("sensor.temp", None)
    assert discovery.lookup("home/livingroom/attrs") == ("sensor.temp", None)
    assert discovery.lookup("home/other") == (None, None)


def test_entity_id_from_device_and_entity_name() -> None:
    discovery = DiscoveryMap()
    discovery.update(
        "homeassistant/binary_sensor/door/config",
        _config(state_topic="z2m/front_door", name="Contact", dev={"name": "Front Door"}),
    )
    assert discovery.lookup("z2m/front_door") == ("binary_sensor.front_door_contact", "Front Door")
    discovery.update(
        "homeassistant/binary_sensor/door2/config",
        _config(stat_t="z2m/back_door", name=None, dev={"name": "Back Door", "sa": "Garden"}),
    )
    # name null: the device's name alone; a suggested area comes first
    assert discovery.lookup("z2m/back_door") == ("binary_sensor.garden_back_door", "Back Door")
    discovery.update("homeassistant/sensor/bare/config", _config(stat_t="bare/state"))
    assert discovery.lookup("bare/state") == ("sensor.mqtt_sensor", None), "default name"


def test_shared_state_topic_is_tagged_with_the_device_not_an_entity() -> None:
    discovery = DiscoveryMap()
    for key in ("temperature", "humidity"):
        discovery.update(
            f"homeassistant/sensor/0x1234/{key}/config",
            _config(stat_t="zigbee2mqtt/kitchen", name=key, dev={"name": "Kitchen"}),
        )
    assert discovery.lookup("zigbee2mqtt/kitchen") == (None, "Kitchen")


def test_empty_payload_removes_the_mapping() -> None:
    discovery = DiscoveryMap()
    topic = "homeassistant/switch/plug/config"
    discovery.update(topic, _config(stat_t="tasmota/plug/POWER", name="Plug"))
    assert discovery.lookup("tasmota/plug/POWER")[0] == "switch.plug"
    assert discovery.update(topic, b"")
    assert discovery.lookup("tasmota/plug/POWER") == (None, None)


def test_device_based_discovery_declares_each_component() -> None:
    discovery = DiscoveryMap()
    discovery.update(
        "homeassistant/device/abc/config",
        _config(
            dev={"ids": ["abc"], "name": "Meter"},
            cmps={"power": {"p": "sensor", "stat_t": "meter/power", "obj_id": "meter_power"}},
        ),
    )
    assert discovery.lookup("meter/power") == ("sensor.meter_mqtt_sensor", "Meter")


def test_default_entity_id_is_slugified_under_the_components_domain() -> None:
    discovery = DiscoveryMap()
    discovery.update(
        "homeassistant/sensor/a/config",
        _config(stat_t="a/state", def_ent_id="sensor.Living_Room-Temp", name="X"),
    )
    discovery.update(
        "homeassistant/binary_sensor/b/config",
        _config(stat_t="b/state", default_entity_id="sensor.window_open", name="X"),
    )
    assert discovery.lookup("a/state")[0] == "sensor.living_room_temp"
    assert discovery.lookup("b/state")[0] == "binary_sensor.window_open"


def test_device_based_components_get_only_the_shared_options_and_child_devices() -> None:
    discovery = DiscoveryMap()
    discovery.update(
        "homeassistant/device/hub1/config",
        _config(
            dev={"ids": ["hub1"], "name": "Hub", "sa": "Hall"},
            stat_t="hub1/state",  # shared: components without a state topic use it
            cmps={
                "t": {"p": "sensor", "name": "Temperature", "uniq_id": "hub1-t"},
                "l": {"p": "light", "name": "Lamp", "stat_t": "hub1/lamp", "uniq_id": "hub1-l"},
            },
            cdevs=[
                {
                    "ids": ["hub1-c1"],
                    "name": "Outlet",
                    "cmps": {
                        "p1": {"p": "sensor", "name": "Power", "stat_t": "hub1/c1/power"},
                        "b": {"p": "sensor", "~": "hub1/c1", "stat_t": "~/volt", "name": None},
                    },
                }
            ],
        ),
    )
    assert discovery.lookup("hub1/state") == ("sensor.hall_hub_temperature", "Hub")
    assert discovery.lookup("hub1/lamp") == ("light.hall_hub_lamp", "Hub")
    # a child device's entity: area and name of its parent first
    assert discovery.lookup("hub1/c1/power") == ("sensor.hall_hub_outlet_power", "Outlet")
    assert discovery.lookup("hub1/c1/volt") == ("sensor.hall_hub_outlet", "Outlet")


def test_a_component_config_can_belong_to_a_child_device() -> None:
    discovery = DiscoveryMap()
    discovery.update(
        "homeassistant/switch/strip_2/config",
        _config(
            stat_t="strip/2",
            name="Relay",
            dev={"ids": ["strip"], "name": "Strip", "cdev": {"ids": ["strip-2"], "name": "Two"}},
        ),
    )
    assert discovery.lookup("strip/2") == ("switch.strip_two_relay", "Two")


class FakeRegistry:
    def __init__(self) -> None:
        self.ids: dict[tuple[str, str], str] = {}

    def mqtt_entity_id(self, domain: str, unique_id: str) -> str | None:
        return self.ids.get((domain, unique_id))

    def on_change(self, listener: Callable[[], None]) -> None:
        raise AssertionError("the discovery map does not listen: the MQTT source does")


def test_the_registrys_entity_id_wins_and_is_followed() -> None:
    registry = FakeRegistry()
    discovery = DiscoveryMap(registry=registry)
    discovery.update(
        "homeassistant/sensor/r/config", _config(stat_t="r/state", name="Raw", uniq_id="r-1")
    )
    assert discovery.lookup("r/state")[0] == "sensor.raw", "not in the registry yet: predicted"
    registry.ids["sensor", "r-1"] = "sensor.renamed_by_user"
    assert discovery.lookup("r/state")[0] == "sensor.renamed_by_user"


def test_config_that_is_not_an_object_is_rejected_without_changing_the_map() -> None:
    discovery = DiscoveryMap()
    try:
        discovery.update("homeassistant/sensor/x/config", b"[1, 2]")
    except TypeError:
        pass
    else:
        raise AssertionError("expected TypeError")
    assert discovery.lookup("x") == (None, None)


def test_slugify() -> None:
    assert slugify("Küche Temperatur #2") == "kuche_temperatur_2"
    assert slugify("***") == "unknown"
    assert slugify("Bob's lamp") == "bobs_lamp"
