"""The MQTT client against a real Mosquitto: QoS 2, MQTT 3.1.1 and the fallback to it, TLS and
mutual TLS, shared subscriptions, and connections that break with messages in flight."""

from __future__ import annotations

import asyncio
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ha_ingestor.checks import check_mqtt
from ha_ingestor.config import load_settings
from ha_ingestor.errors import CheckError
from tests.e2e.service import RunningService, numbered, run_service, service_env
from tests.support.mqtt_proxy import MqttProxy
from tests.support.mqtt_publisher import Message, Publisher, publish_many, publish_packet
from tests.support.servers import HOST, InfluxDB1, Mosquitto, free_port, started
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def stored_payloads(service: RunningService) -> list[int]:
    rows = service.influx.rows("SELECT payload FROM mqtt_message", service.database)
    return sorted(int(row["payload"]) for row in rows)


async def wait_for_count(service: RunningService, expected: int, timeout: float = 60) -> None:
    await wait_for(lambda: service.count("mqtt_message") >= expected, timeout=timeout)


async def settled(service: RunningService) -> None:
    """Everything received is written: nothing more can arrive (no duplicate yet to come)."""

    def idle() -> bool:
        pending = service.metric("ha_ingestor_queue_depth", queue="spool_pending")
        return pending == 0 and service.metric("ha_ingestor_spool_lines") == 0

    await wait_for(idle, timeout=30, message="spool drained")


# --- QoS 2, MQTT 3.1.1 and the fallback ----------------------------------------------------------


async def test_qos2_end_to_end_stores_each_message_exactly_once(
    tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, influx_db: str, topic_prefix: str
) -> None:
    env = service_env(
        tmp_path, influxdb, influx_db, mosquitto, mqtt_topics=f"{topic_prefix}/#", mqtt_qos="2"
    )
    async with run_service(env, influxdb, influx_db) as service:
        await publish_many(
            mosquitto.host, mosquitto.port, numbered(topic_prefix, 0, 3000, qos=2), "qos2-pub"
        )
        await wait_for_count(service, 3000)
        await settled(service)
        assert stored_payloads(service) == list(range(3000))
        rows = service.influx.rows("SELECT qos FROM mqtt_message", service.database)
        assert {row["qos"] for row in rows} == {2}


async def test_mqtt_311_forced(
    tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, influx_db: str, topic_prefix: str
) -> None:
    env = service_env(
        tmp_path,
        influxdb,
        influx_db,
        mosquitto,
        mqtt_topics=f"{topic_prefix}/#",
        mqtt_protocol="3.1.1",
    )
    async with run_service(env, influxdb, influx_db) as service:
        await publish_many(mosquitto.host, mosquitto.port, numbered(topic_prefix, 0, 1000))
        await wait_for_count(service, 1000)
        await settled(service)
        assert stored_payloads(service) == list(range(1000))


async def test_auto_falls_back_to_311_when_the_broker_refuses_mqtt5_and_stays_there(
    tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, influx_db: str, topic_prefix: str
) -> None:
    async with MqttProxy(mosquitto.host, mosquitto.port, refuse_mqtt5=True) as proxy:
        env = service_env(
            tmp_path,
            influxdb,
            influx_db,
            mosquitto,
            mqtt_topics=f"{topic_prefix}/#",
            mqtt_port=str(proxy.port),
        )
        async with run_service(env, influxdb, influx_db) as service:
            assert service.service.telemetry.is_connected("mqtt")
            assert proxy.refused == 1
            await publish_many(mosquitto.host, mosquitto.port, numbered(topic_prefix, 0, 500))
            await wait_for_count(service, 500)
            proxy.cut()  # the reconnect speaks 3.1.1 straight away
            await wait_for(lambda: proxy.connections == 2, timeout=30)
            await publish_many(mosquitto.host, mosquitto.port, numbered(topic_prefix, 500, 500))
            await wait_for_count(service, 1000)
            await settled(service)
            assert stored_payloads(service) == list(range(1000))
            assert proxy.refused == 1


async def test_check_names_the_protocol_and_a_refused_mqtt5(mosquitto: Mosquitto) -> None:
    async with MqttProxy(mosquitto.host, mosquitto.port, refuse_mqtt5=True) as proxy:
        base = {
            "HA_INGESTOR_MQTT_HOST": HOST,
            "HA_INGESTOR_MQTT_PORT": str(proxy.port),
            "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:1",
        }
        assert "MQTT 3.1.1" in await check_mqtt(load_settings(base))
        with pytest.raises(CheckError, match="refused MQTT protocol version"):
            await check_mqtt(load_settings({**base, "HA_INGESTOR_MQTT_PROTOCOL": "5"}))
    direct = {
        "HA_INGESTOR_MQTT_HOST": HOST,
        "HA_INGESTOR_MQTT_PORT": str(mosquitto.port),
        "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:1",
    }
    assert "MQTT 5" in await check_mqtt(load_settings(direct))


# --- authentication ------------------------------------------------------------------------------


async def test_username_and_password_are_sent_and_a_wrong_password_is_named(
    tmp_path: Path, influxdb: InfluxDB1, influx_db: str, topic_prefix: str
) -> None:
    users = {"ingestor": "s3cret", "publisher": "pub"}
    with started(Mosquitto(tmp_path / "broker", users=users)) as broker:
        base = {
            "HA_INGESTOR_MQTT_HOST": HOST,
            "HA_INGESTOR_MQTT_PORT": str(broker.port),
            "HA_INGESTOR_MQTT_USERNAME": "ingestor",
            "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:1",
        }
        with pytest.raises(CheckError, match="refused the connection"):
            await check_mqtt(load_settings({**base, "HA_INGESTOR_MQTT_PASSWORD": "wrong"}))
        assert "connected" in await check_mqtt(
            load_settings({**base, "HA_INGESTOR_MQTT_PASSWORD": "s3cret"})
        )
        env = service_env(
            tmp_path,
            influxdb,
            influx_db,
            broker,
            mqtt_topics=f"{topic_prefix}/#",
            mqtt_username="ingestor",
            mqtt_password="s3cret",
        )
        async with run_service(env, influxdb, influx_db) as service:

            def publish() -> None:
                with Publisher(broker.host, broker.port, "auth-pub", "publisher", "pub") as pub:
                    pub.publish_many(numbered(topic_prefix, 0, 200))

            await asyncio.to_thread(publish)
            await wait_for_count(service, 200)
            await settled(service)
            assert stored_payloads(service) == list(range(200))


# --- TLS -----------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> Path:
    """A CA, a broker certificate for 127.0.0.1 and a client certificate, all signed by it."""
    directory.mkdir()
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    for name, extensions in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (directory / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "authorityKeyIdentifier=keyid\n" + extensions
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr",
            cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
            cwd=directory,
        )  # fmt: skip
        (directory / f"{name}.key").chmod(0o644)  # readable by the broker's own user
    return directory


class TlsMosquitto(Mosquitto):
    """Mosquitto with a plain listener (for the test publisher) and a TLS one."""

    def __init__(self, directory: Path, certs: Path, *, require_certificate: bool) -> None:
        self.tls_port = free_port()
        self._certs = certs
        self._require_certificate = require_certificate
        super().__init__(directory)

    def _write_config(self) -> None:
        super()._write_config()
        certs = self._certs
        with self.config_path.open("a") as config:
            config.write(
                f"listener {self.tls_port} {HOST}\n"
                f"cafile {certs / 'ca.crt'}\n"
                f"certfile {certs / 'server.crt'}\n"
                f"keyfile {certs / 'server.key'}\n"
                f"require_certificate {'true' if self._require_certificate else 'false'}\n"
            )


def _tls_settings(broker: TlsMosquitto, certs: Path, client_cert: bool) -> dict[str, str]:
    env = {
        "HA_INGESTOR_MQTT_HOST": HOST,
        "HA_INGESTOR_MQTT_PORT": str(broker.tls_port),
        "HA_INGESTOR_MQTT_TLS": "true",
        "HA_INGESTOR_MQTT_CA_FILE": str(certs / "ca.crt"),
        "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:1",
    }
    if client_cert:
        env["HA_INGESTOR_MQTT_CERT_FILE"] = str(certs / "client.crt")
        env["HA_INGESTOR_MQTT_KEY_FILE"] = str(certs / "client.key")
    return env


async def test_tls_verifies_the_broker_and_stores_messages(
    tmp_path: Path, influxdb: InfluxDB1, influx_db: str, topic_prefix: str
) -> None:
    certs = make_certificates(tmp_path / "certs")
    with started(TlsMosquitto(tmp_path / "broker", certs, require_certificate=False)) as broker:
        assert "connected" in await check_mqtt(load_settings(_tls_settings(broker, certs, False)))
        wrong_ca = {**_tls_settings(broker, certs, False), "HA_INGESTOR_MQTT_CA_FILE": ""}
        with pytest.raises(CheckError, match="CERTIFICATE_VERIFY_FAILED"):
            await check_mqtt(load_settings({k: v for k, v in wrong_ca.items() if v}))
        env = service_env(tmp_path, influxdb, influx_db, broker, mqtt_topics=f"{topic_prefix}/#")
        env |= _tls_settings(broker, certs, False) | {"HA_INGESTOR_INFLUX_URL": influxdb.url}
        async with run_service(env, influxdb, influx_db) as service:
            await publish_many(broker.host, broker.port, numbered(topic_prefix, 0, 300))
            await wait_for_count(service, 300)
            await settled(service)
            assert stored_payloads(service) == list(range(300))


async def test_mutual_tls_needs_the_client_certificate(
    tmp_path: Path, influxdb: InfluxDB1, influx_db: str, topic_prefix: str
) -> None:
    certs = make_certificates(tmp_path / "certs")
    with started(TlsMosquitto(tmp_path / "broker", certs, require_certificate=True)) as broker:
        with pytest.raises(CheckError):
            await check_mqtt(load_settings(_tls_settings(broker, certs, client_cert=False)))
        assert "connected" in await check_mqtt(load_settings(_tls_settings(broker, certs, True)))
        env = service_env(tmp_path, influxdb, influx_db, broker, mqtt_topics=f"{topic_prefix}/#")
        env |= _tls_settings(broker, certs, True) | {"HA_INGESTOR_INFLUX_URL": influxdb.url}
        async with run_service(env, influxdb, influx_db) as service:
            await publish_many(broker.host, broker.port, numbered(topic_prefix, 0, 300))
            await wait_for_count(service, 300)
            await settled(service)
            assert stored_payloads(service) == list(range(300))


# --- shared subscriptions ------------------------------------------------------------------------


async def test_two_instances_on_a_shared_subscription_store_every_message_once(
    tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, influx_db: str, topic_prefix: str
) -> None:
    def env(name: str) -> dict[str, str]:
        return service_env(
            tmp_path / name,
            influxdb,
            influx_db,
            mosquitto,
            mqtt_topics=f"$share/ingestors/{topic_prefix}/#",
            mqtt_client_id=f"shared-{name}-{influx_db}",
        )

    async with (
        run_service(env("a"), influxdb, influx_db) as first,
        run_service(env("b"), influxdb, influx_db) as second,
    ):
        await publish_many(mosquitto.host, mosquitto.port, numbered(topic_prefix, 0, 4000))
        await wait_for_count(first, 4000)
        await settled(first)
        await settled(second)
        assert stored_payloads(first) == list(range(4000))
        received = [
            s.metric("ha_ingestor_events_received_total", source="mqtt") for s in (first, second)
        ]
        assert sum(received) == 4000
        assert min(received) > 0  # the broker shared the stream between both


# --- connections that break with messages in flight --------------------------------------------


def switch_messages(prefix: str, start: int, count: int) -> list[Message]:
    """ON, OFF, ON, … per switch: the same payloads over and over on the same topics."""
    return [
        Message(f"{prefix}/switch/{i % 5}", b"ON" if (i // 5) % 2 == 0 else b"OFF", 1)
        for i in range(start, start + count)
    ]


def assert_each_switch_history_complete(service: RunningService, total: int) -> None:
    rows = service.influx.rows("SELECT payload, topic FROM mqtt_message", service.database)
    history: dict[str, list[str]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["time"]):
        history[row["topic"]].append(row["payload"])
    assert len(rows) == total
    for switch in range(5):
        expected = ["ON" if n % 2 == 0 else "OFF" for n in range(total // 5)]
        assert history[f"{service.prefix}/switch/{switch}"] == expected


@pytest.fixture
async def proxied_service(
    tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, influx_db: str, topic_prefix: str
) -> AsyncIterator[tuple[RunningService, MqttProxy]]:
    async with MqttProxy(mosquitto.host, mosquitto.port) as proxy:
        env = service_env(
            tmp_path,
            influxdb,
            influx_db,
            mosquitto,
            mqtt_topics=f"{topic_prefix}/#",
            mqtt_port=str(proxy.port),
            # A long group commit: fewer than 16 messages (a trickle) stay received but not
            # durable for a second, long enough for the connection to break under them.
            spool_commit_interval="1.0",
        )
        async with run_service(env, influxdb, influx_db) as service:
            yield service, proxy


def duplicates(service: RunningService) -> float:
    return service.metric(
        "ha_ingestor_events_dropped_total", reason="duplicate_redelivery", intentional="true"
    )


async def test_messages_in_flight_when_the_connection_breaks_are_stored_once(
    proxied_service: tuple[RunningService, MqttProxy], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    service, proxy = proxied_service
    await publish_many(mosquitto.host, mosquitto.port, switch_messages(topic_prefix, 0, 100))
    await wait_for_count(service, 100)
    await settled(service)
    in_flight = 10  # a trickle: their commit waits the whole second
    await publish_many(
        mosquitto.host, mosquitto.port, switch_messages(topic_prefix, 100, in_flight)
    )
    received = ("ha_ingestor_events_received_total", "mqtt")
    await wait_for(
        lambda: service.metric(received[0], source=received[1]) >= 100 + in_flight, interval=0.01
    )
    proxy.cut()  # before their commit: no acknowledgement left; the broker sends them again
    await wait_for(
        lambda: duplicates(service) >= in_flight, timeout=60, message="redeliveries known"
    )
    total = 100 + in_flight + 200
    await publish_many(
        mosquitto.host, mosquitto.port, switch_messages(topic_prefix, 100 + in_flight, 200)
    )
    await wait_for_count(service, total)
    await settled(service)
    assert duplicates(service) == in_flight
    assert proxy.connections == 2
    assert_each_switch_history_complete(service, total)


async def test_messages_lost_on_the_way_are_stored_when_redelivered_despite_equal_payloads(
    proxied_service: tuple[RunningService, MqttProxy], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    service, proxy = proxied_service
    await publish_many(mosquitto.host, mosquitto.port, switch_messages(topic_prefix, 0, 100))
    await wait_for_count(service, 100)
    proxy.drop_from_broker = True  # the broker counts the next 200 as sent; none arrives
    lost = switch_messages(topic_prefix, 100, 200)
    await publish_many(mosquitto.host, mosquitto.port, lost)
    size = sum(len(publish_packet(m, 1)) for m in lost)
    await wait_for(lambda: proxy.dropped_from_broker >= size, timeout=30)
    proxy.drop_from_broker = False
    proxy.cut()  # redelivered with DUP: an earlier ON/OFF on each topic must not hide them
    await wait_for_count(service, 300)
    await publish_many(mosquitto.host, mosquitto.port, switch_messages(topic_prefix, 300, 200))
    await wait_for_count(service, 500)
    await settled(service)
    assert_each_switch_history_complete(service, 500)
    assert duplicates(service) == 0


async def test_a_broker_that_closes_the_stream_mid_packet_is_reconnected(
    proxied_service: tuple[RunningService, MqttProxy], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    service, proxy = proxied_service
    publisher = asyncio.create_task(
        publish_many(mosquitto.host, mosquitto.port, numbered(topic_prefix, 0, 20_000))
    )
    await wait_for(lambda: service.metric("ha_ingestor_events_received_total", source="mqtt") > 0)
    proxy.cut()  # wherever the stream is: likely inside a packet
    await publisher
    await wait_for_count(service, 20_000, timeout=120)
    await settled(service)
    numbers = stored_payloads(service)
    assert set(numbers) == set(range(20_000))  # nothing lost; a redelivery may repeat a few
    assert proxy.connections >= 2
