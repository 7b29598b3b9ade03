import base64

import pytest

from ha_ingestor.pipeline.mqtt_discovery import DiscoveryMap
from ha_ingestor.pipeline.mqtt_messages import MqttMessageEncoder

T = 1_700_000_000_123_456_789


def _encoder(**kwargs: object) -> tuple[MqttMessageEncoder, list[tuple[str, str]]]:
    invalid: list[tuple[str, str]] = []
    options: dict[str, object] = {
        "instance": "home",
        "static_tags": {},
        "discovery": DiscoveryMap(),
        "on_invalid": lambda reason, topic: invalid.append((reason, topic)),
    }
    options.update(kwargs)
    return MqttMessageEncoder(**options), invalid  # type: ignore[arg-type]


def test_zigbee2mqtt_json_becomes_dotted_float_fields() -> None:
    encoder, invalid = _encoder()
    line = encoder.encode(
        "zigbee2mqtt/kitchen",
        b'{"temperature":21.5,"battery":98,"occupancy":true,"state":"ON",'
        b'"update":{"installed_version":3},"list":[1,2],"n":null}',
        0,
        False,
        T,
    )
    assert line.startswith("mqtt_message,instance=home,topic=zigbee2mqtt/kitchen ")
    assert line.endswith(f" {T}")
    for field in (
        "temperature=21.5",
        "battery=98.0",
        "occupancy=1.0",
        "update.installed_version=3.0",
        "qos=0i",
        "retained=false",
        "size=",
    ):
        assert f",{field}" in line or f" {field}" in line
    assert "state=" not in line.replace('\\"state\\"', "")  # string leaves stay in the payload
    assert "list=" not in line.replace('\\"list\\"', "")
    assert invalid == []


@pytest.mark.parametrize(
    ("payload", "value"),
    [(b"23.5", "23.5"), (b" 7 ", "7.0"), (b"ON", "1.0"), (b"off", "0.0"), (b"-1e3", "-1000.0")],
)
def test_plain_numbers_and_boolean_words_get_a_value(payload: bytes, value: str) -> None:
    encoder, _ = _encoder()
    assert f",value={value}," in encoder.encode("t", payload, 1, True, T)


def test_text_empty_and_non_finite_payloads_have_no_value() -> None:
    encoder, _ = _encoder()
    for payload in (b"hello world", b"", b"nan", b"inf"):
        line = encoder.encode("t", payload, 0, False, T)
        assert ",value=" not in line
        assert f'payload="{payload.decode()}"' in line


def test_string_escaping_keeps_quotes_and_backslashes() -> None:
    encoder, _ = _encoder()
    line = encoder.encode("t", b'say "hi" \\ bye', 0, False, T)
    assert 'payload="say \\"hi\\" \\\\ bye"' in line


def test_invalid_utf8_is_stored_as_base64_and_counted() -> None:
    encoder, invalid = _encoder()
    payload = b"\xff\xfe\x00binary"
    line = encoder.encode("dev/raw", payload, 0, False, T)
    assert f'payload="{base64.b64encode(payload).decode()}"' in line
    assert 'encoding="base64"' in line
    assert f"size={len(payload)}i" in line
    assert invalid == [("invalid_utf8", "dev/raw")]


def test_oversized_payload_is_truncated_and_flagged() -> None:
    encoder, invalid = _encoder(max_payload_bytes=101)
    payload = ("é" * 200).encode()  # a 2-byte character cut in half at the cap
    line = encoder.encode("big", payload, 0, False, T)
    assert "truncated=true" in line
    assert f"size={len(payload)}i" in line
    assert 'payload="' + "é" * 50 + '"' in line
    assert invalid == [("oversized", "big")]


def test_oversized_payload_keeps_every_byte_up_to_the_cap() -> None:
    encoder, invalid = _encoder(max_payload_bytes=100)
    for payload in (b"x" * 150, ("é" * 75).encode(), b"12345" * 30, b'{"a": 1}' + b" " * 100):
        line = encoder.encode("big", payload, 0, False, T)
        stored = payload[:100].decode().replace('"', '\\"')
        assert f' payload="{stored}",qos=0i' in line
        assert line.endswith(f",size={len(payload)}i,truncated=true {T}")
        assert ",value=" not in line  # a number cut at the cap is not that number
        assert ",a=" not in line  # nor is a cut JSON document parsed
    assert invalid == [("oversized", "big")] * 4


def test_invalid_json_is_kept_as_payload_and_counted() -> None:
    encoder, invalid = _encoder()
    line = encoder.encode("t", b'{"a": 1,', 0, False, T)
    assert 'payload="{\\"a\\": 1,"' in line
    assert invalid == [("invalid_json", "t")]


def test_reserved_and_refused_field_names_are_renamed() -> None:
    encoder, _ = _encoder()
    line = encoder.encode("t", b'{"size": 3, "qos": 1, "time": 5, "value": 2, "": 9}', 0, False, T)
    assert "json.size=3.0" in line
    assert "json.qos=1.0" in line
    assert "json.time=5.0" in line
    assert "json.value=2.0" in line
    assert "=9.0" not in line


def test_leaf_count_is_capped() -> None:
    encoder, invalid = _encoder(max_fields=3)
    line = encoder.encode("t", b'{"a":1,"b":2,"c":3,"d":4,"e":5}', 0, False, T)
    assert "c=3.0" in line
    assert "d=4.0" not in line
    assert invalid == [("too_many_fields", "t")]


def test_awkward_topics_are_escaped_in_the_tag() -> None:
    encoder, _ = _encoder()
    line = encoder.encode('a b,c=d"e\\f/ü', b"1", 0, False, T)
    # Backslashes stay single: InfluxDB reads them literally in tag values.
    assert line.startswith('mqtt_message,instance=home,topic=a\\ b\\,c\\=d"e\\f/ü ')


def test_discovered_topic_gets_entity_id_and_cache_follows_changes() -> None:
    discovery = DiscoveryMap()
    encoder, _ = _encoder(discovery=discovery, static_tags={"site": "lab"})
    assert "entity_id" not in encoder.encode("z/plug", b"ON", 0, False, T)
    discovery.update("homeassistant/switch/plug/config", b'{"stat_t":"z/plug","name":"Plug"}')
    encoder.discovery_changed()
    line = encoder.encode("z/plug", b"ON", 0, False, T)
    assert line.startswith(
        "mqtt_message,entity_id=switch.plug,instance=home,site=lab,topic=z/plug "
    )
