from pathlib import Path

import pytest

from ha_ingestor.config import ConfigError, InfluxApi, load_settings

BASE = {"HA_INGESTOR_MQTT_HOST": "broker", "HA_INGESTOR_INFLUX_URL": "http://db:8086"}


def test_defaults() -> None:
    settings = load_settings(BASE)
    assert settings.mqtt_topics == ["#"]
    assert settings.mqtt_qos == 1
    assert settings.effective_mqtt_port == 1883
    assert settings.influx_api is InfluxApi.AUTO
    assert settings.influx_database == "home_assistant"
    assert settings.influx_batch_size == 5000
    assert settings.spool_max_bytes == 1024**3
    assert settings.http_port == 8000
    assert not settings.ha_enabled


def test_lists_tags_and_tls_port() -> None:
    settings = load_settings(
        {
            **BASE,
            "HA_INGESTOR_MQTT_TOPICS": "zigbee2mqtt/#, tele/+/SENSOR",
            "HA_INGESTOR_TAGS": "site=home, floor=1",
            "HA_INGESTOR_MQTT_TLS": "true",
        }
    )
    assert settings.mqtt_topics == ["zigbee2mqtt/#", "tele/+/SENSOR"]
    assert settings.tags == {"site": "home", "floor": "1"}
    assert settings.effective_mqtt_port == 8883


@pytest.mark.parametrize(
    ("env", "variable", "fragment"),
    [
        ({"HA_INGESTOR_MQTT_HOST": "b"}, "HA_INGESTOR_INFLUX_URL", "required"),
        ({**BASE, "HA_INGESTOR_MQTT_QOS": "3"}, "HA_INGESTOR_MQTT_QOS", "less than or equal"),
        ({**BASE, "HA_INGESTOR_MQTT_PORT": "x"}, "HA_INGESTOR_MQTT_PORT", "integer"),
        ({**BASE, "HA_INGESTOR_INFLUX_URL": "db:8086"}, "HA_INGESTOR_INFLUX_URL", "http://"),
        ({**BASE, "HA_INGESTOR_TAGS": "novalue"}, "HA_INGESTOR_TAGS", "k=v"),
        ({**BASE, "HA_INGESTOR_INFLUX_API": "v9"}, "HA_INGESTOR_INFLUX_API", "v1"),
        ({**BASE, "HA_INGESTOR_INFLUX_DATABASE": " "}, "HA_INGESTOR_INFLUX_DATABASE", "empty"),
        ({**BASE, "HA_INGESTOR_MQTT_HOTS": "x"}, "HA_INGESTOR_MQTT_HOTS", "unknown setting"),
        ({"HA_INGESTOR_INFLUX_URL": "http://db"}, "configuration", "no source is enabled"),
        (
            {**BASE, "HA_INGESTOR_MQTT_CA_FILE": "/etc/ca.pem"},
            "configuration",
            "HA_INGESTOR_MQTT_CA_FILE set, but HA_INGESTOR_MQTT_TLS is not true",
        ),
    ],
)
def test_invalid_values_name_the_variable(
    env: dict[str, str], variable: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert info.value.variable == variable
    assert fragment in str(info.value)


def test_secret_from_file_and_never_in_errors(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("s3cr3t-token\n")
    settings = load_settings({**BASE, "HA_INGESTOR_INFLUX_TOKEN_FILE": str(secret_file)})
    assert settings.influx_token is not None
    assert settings.influx_token.get_secret_value() == "s3cr3t-token"
    assert "s3cr3t" not in repr(settings)

    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "HA_INGESTOR_MQTT_PASSWORD": "hunter2", "HA_INGESTOR_MQTT_QOS": "9"})
    assert "hunter2" not in str(info.value)


def test_secret_file_problems_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "HA_INGESTOR_HA_TOKEN_FILE": str(tmp_path / "missing")})
    assert info.value.variable == "HA_INGESTOR_HA_TOKEN_FILE"
    with pytest.raises(ConfigError, match="set only one"):
        load_settings({**BASE, "HA_INGESTOR_HA_TOKEN": "a", "HA_INGESTOR_HA_TOKEN_FILE": "/x"})


@pytest.mark.timeout(10)
def test_a_payload_cap_above_influxdbs_string_limit_is_refused_by_name() -> None:
    env = {
        "HA_INGESTOR_MQTT_HOST": "broker",
        "HA_INGESTOR_INFLUX_URL": "http://localhost:8086",
        "HA_INGESTOR_MQTT_MAX_PAYLOAD_BYTES": str(2 * 1024 * 1024),
    }
    with pytest.raises(ConfigError, match="HA_INGESTOR_MQTT_MAX_PAYLOAD_BYTES"):
        load_settings(env)
    env["HA_INGESTOR_HA_STATE_FIELDS_ALWAYS"] = "attributes,nope"
    env["HA_INGESTOR_MQTT_MAX_PAYLOAD_BYTES"] = "65536"
    with pytest.raises(ConfigError, match="HA_INGESTOR_HA_STATE_FIELDS_ALWAYS"):
        load_settings(env)
    env["HA_INGESTOR_HA_STATE_FIELDS_ALWAYS"] = "all"
    assert set(load_settings(env).ha_state_fields_always) == {
        "attributes",
        "context",
        "last_reported",
        "last_changed",
        "previous_state",
    }
