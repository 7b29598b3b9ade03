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
    assert discovery.lookup("home/livingroom/state") == ("sensor.living_temp", None)
    assert discovery.lookup("home/livingroom/attrs") == ("sensor.living_temp", None)
    assert discovery.lookup("home/other") == (None, None)


def test_entity_id_from_device_and_entity_name() -> None:
    discovery = DiscoveryMap()
    discovery.update(
        "homeassistant/binary_sensor/door/config",
        _config(state_topic="z2m/front_door", name="Contact", dev={"name": "Front Door"}),
    )
    assert discovery.lookup("z2m/front_door") == ("binary_sensor.front_door_contact", "Front Door")


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
    discovery.update(topic, _config(stat_t="tasmota/plug/POWER", obj_id="plug"))
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
    assert discovery.lookup("meter/power") == ("sensor.meter_power", "Meter")


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
