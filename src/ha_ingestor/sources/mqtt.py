"""The MQTT source: subscribe to the broker Home Assistant uses and hand every message on.

Lifecycle: one gmqtt client per connection attempt; when it drops, wait a capped, jittered,
exponentially growing delay and connect again (subscriptions are renewed on every connect).
gmqtt's own reconnect loop is switched off because its delay is fixed.

Delivery: QoS 1/2 messages are acknowledged only after their line is durable in the spool
(see ``mqtt_fast_path``: the PUBACK is sent from the spool's commit callback). With a stable client id and a session
expiry the broker keeps queueing while the ingestor is away; a Receive Maximum of 65535 keeps
delayed acknowledgements from throttling the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections import OrderedDict
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from ha_ingestor.backoff import Backoff
from ha_ingestor.config import Settings
from ha_ingestor.errors import describe
from ha_ingestor.pipeline.buffer import Buffer
from ha_ingestor.pipeline.mqtt_discovery import DiscoveryMap, MqttEntityRegistry
from ha_ingestor.pipeline.mqtt_messages import MqttMessageEncoder
from ha_ingestor.sources.mqtt_fast_path import PublishFastPath
from ha_ingestor.telemetry import ConnState, Telemetry
from ha_ingestor.tls import mqtt_tls_context

TARGET = "mqtt"
_CONNECT_TIMEOUT = 10.0
_NO_RECONNECT = -2  # any value below gmqtt's UNLIMITED_RECONNECTS (-1): never reconnect by itself
_MAX_CACHED_TOPICS = 100_000
_ACK_ON_SHUTDOWN_TIMEOUT = 2.0


class TopicFilters:
    """MQTT topic filters (``+`` and ``#`` wildcards) compiled once; results cached per topic."""

    def __init__(self, filters: list[str]) -> None:
        self._patterns = [_compile_filter(f) for f in filters]
        self._match_all = "#" in filters
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def matches(self, topic: str) -> bool:
        if self._match_all:
            return True
        result = self._cache.get(topic)
        if result is None:
            if len(self._cache) >= _MAX_CACHED_TOPICS:
                self._cache.clear()
            result = self._cache[topic] = any(p.fullmatch(topic) for p in self._patterns)
        return result


def _compile_filter(topic_filter: str) -> re.Pattern[str]:
    if topic_filter.startswith("$share/"):  # $share/<group>/<filter> subscribes to <filter>
        topic_filter = topic_filter.split("/", 2)[2]
    pattern = ""
    for index, level in enumerate(topic_filter.split("/")):
        separator = "/" if index else ""
        if level == "#":  # also matches the parent level itself: a/# matches a
            pattern += f"(?:{separator}.*)?" if index else ".*"
            break
        pattern += separator + ("[^/]*" if level == "+" else re.escape(level))
    # Wildcards at the first level do not match topics starting with '$' (MQTT 4.7.2).
    if topic_filter[:1] in ("+", "#"):
        pattern = r"(?!\$)" + pattern
    return re.compile(pattern, re.DOTALL)


class RetainedReplays:
    """Recognises retained messages the broker replays on (re)subscribe.

    A retained message whose payload equals the last payload seen on its topic is the same
    "last known value" again, not a new event.
    """

    def __init__(self) -> None:
        self._last: dict[str, bytes] = {}

    @staticmethod
    def _fingerprint(payload: bytes) -> bytes:
        return payload if len(payload) <= 64 else hashlib.blake2b(payload, digest_size=16).digest()

    def is_replay(self, topic: str, payload: bytes, retained: bool) -> bool:
        last = self._last
        if retained:
            fingerprint = self._fingerprint(payload)
            if last.get(topic) == fingerprint:
                return True
            if len(last) >= _MAX_CACHED_TOPICS:
                last.clear()
            last[topic] = fingerprint
        elif topic in last:
            last[topic] = self._fingerprint(payload)
        return False


class Redeliveries:
    """Recognises QoS 1/2 messages the broker sends again (DUP flag) after a connection broke
    before our acknowledgement arrived: they are already in the spool, so storing them again
    would duplicate them. Remembers the most recent messages per (topic, payload)."""

    def __init__(self, capacity: int = 65_536) -> None:
        self._recent: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._capacity = capacity

    def seen(self, topic: str, payload: bytes, redelivery: bool) -> bool:
        key = (topic, RetainedReplays._fingerprint(payload))
        recent = self._recent
        if redelivery and key in recent:
            return True
        recent[key] = None
        if len(recent) > self._capacity:
            recent.popitem(last=False)
        return False


class MqttSource:
    """Feeds ``mqtt_message`` lines into the buffer until cancelled."""

    def __init__(
        self,
        settings: Settings,
        buffer: Buffer,
        telemetry: Telemetry,
        instance: str,
        entity_registry: MqttEntityRegistry | None = None,
    ) -> None:
        self._settings = settings
        self._buffer = buffer
        self._telemetry = telemetry
        self._discovery = DiscoveryMap(settings.mqtt_discovery_prefix, entity_registry)
        self._encoder = MqttMessageEncoder(
            instance=instance,
            static_tags=settings.tags,
            discovery=self._discovery,
            max_payload_bytes=settings.mqtt_max_payload_bytes,
            max_fields=settings.mqtt_max_fields,
            on_invalid=self._invalid,
        )
        if entity_registry is not None:
            entity_registry.on_change(self._encoder.discovery_changed)
        self._include = TopicFilters(settings.mqtt_topics)
        self._exclude = TopicFilters(settings.mqtt_exclude_topics)
        self._replays = RetainedReplays()
        self._redeliveries = Redeliveries()
        self._received = telemetry.metrics.events_received.labels(TARGET)
        self._last_ns = 0
        self._protocol = MQTTv311 if settings.mqtt_protocol == "3.1.1" else MQTTv50
        self._disconnected = asyncio.Event()
        self._paused = False
        self._connection_client: Any = None
        self._uncounted = 0
        self._resume_task: asyncio.Task[None] | None = None
        self._last_accepted: asyncio.Future[None] | None = None
        prefix = settings.mqtt_discovery_prefix
        self._discovery_filters = [f"{prefix}/+/+/config", f"{prefix}/+/+/+/config"]

    @property
    def encoder(self) -> MqttMessageEncoder:
        return self._encoder

    async def run(self) -> None:
        backoff = Backoff()
        telemetry = self._telemetry
        telemetry.set_state(TARGET, ConnState.CONNECTING)
        while True:
            client = self._new_client()
            try:
                await self._connect(client)
            except asyncio.CancelledError:
                await _close(client)
                raise
            except Exception as exc:
                await _close(client)
                telemetry.set_state(TARGET, ConnState.RECONNECTING, error=describe(exc))
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            telemetry.set_state(TARGET, ConnState.CONNECTED)
            try:
                await self._disconnected.wait()
            except asyncio.CancelledError:
                await self._acknowledge_accepted()
                raise
            finally:
                await _close(client)
            telemetry.set_state(TARGET, ConnState.RECONNECTING, error="connection lost")
            await asyncio.sleep(backoff.next_delay())

    def _new_client(self) -> Any:
        settings = self._settings
        persistent = settings.mqtt_session_expiry > 0
        properties: dict[str, Any] = {"receive_maximum": 65535}
        if persistent:
            properties["session_expiry_interval"] = settings.mqtt_session_expiry
        client = gmqtt.Client(
            settings.mqtt_client_id,
            clean_session=not persistent,
            optimistic_acknowledgement=False,
            **properties,
        )
        client.set_config({"reconnect_retries": _NO_RECONNECT})
        if settings.mqtt_username:
            password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
            client.set_auth_credentials(settings.mqtt_username, password)
        client.on_disconnect = self._on_disconnect
        self._connection_client = client
        return client

    async def _connect(self, client: Any) -> None:
        settings = self._settings
        self._disconnected.clear()
        ssl_context = mqtt_tls_context(settings) if settings.mqtt_tls else False
        version = self._protocol
        fast_path = PublishFastPath(client, self._on_publish, self._publish_failed)
        fast_path.install_handler()
        try:
            await asyncio.wait_for(
                client.connect(
                    settings.mqtt_host,
                    settings.effective_mqtt_port,
                    ssl=ssl_context,
                    keepalive=settings.mqtt_keepalive,
                    version=version,
                ),
                _CONNECT_TIMEOUT,
            )
        except TimeoutError:
            # gmqtt switches a refused MQTT 5 CONNECT to 3.1.1 and then waits for its own
            # reconnect, which we disabled: fall back ourselves on the next attempt.
            if (
                settings.mqtt_protocol == "auto"
                and client._connection_state.protocol_version == MQTTv311
            ):
                self._protocol = MQTTv311
                self._telemetry.log.warning("mqtt protocol fallback", protocol="3.1.1")
            raise ConnectionError("broker did not answer CONNECT") from None
        fast_path.install_reader()
        filters = [*self._settings.mqtt_topics]
        if not self._include.matches(f"{settings.mqtt_discovery_prefix}/x/y/config"):
            filters += self._discovery_filters
        # retain_handling 1: the broker sends retained messages only for a new subscription,
        # so a resumed persistent session does not replay them.
        subscriptions = [
            gmqtt.Subscription(f, qos=settings.mqtt_qos, retain_handling_options=1) for f in filters
        ]
        subscribed: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()

        def on_subscribe(_client: Any, _mid: int, granted: list[int], _properties: Any) -> None:
            if not subscribed.done():
                subscribed.set_result(list(granted))

        client.on_subscribe = on_subscribe
        client.subscribe(subscriptions)
        # Connected means subscribed: a message published after readiness must not be missed.
        granted = await asyncio.wait_for(subscribed, _CONNECT_TIMEOUT)
        refused = [f for f, code in zip(filters, granted, strict=False) if code >= 0x80]
        if refused:
            raise PermissionError(f"broker refused the subscription to {', '.join(refused)}")
        self._telemetry.log.info(
            "mqtt subscribed",
            filters=filters,
            qos=settings.mqtt_qos,
            client_id=settings.mqtt_client_id,
        )

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        self._disconnected.set()

    def _publish_failed(self, exc: Exception) -> None:
        self._telemetry.dropped("unhandled_message", intentional=False)
        self._telemetry.error(TARGET, "mqtt message not handled", error=describe(exc))

    def _invalid(self, reason: str, topic: str) -> None:
        self._telemetry.invalid(TARGET, reason, topic=topic)

    def _timestamp(self) -> int:
        # Strictly increasing: two messages on one topic never share a time (and so never
        # overwrite each other in InfluxDB), whatever the clock's resolution.
        now = time.time_ns()
        if now <= self._last_ns:
            now = self._last_ns + 1
        self._last_ns = now
        return now

    def _on_publish(
        self, topic: str, payload: bytes, qos: int, retained: bool, redelivery: bool = False
    ) -> asyncio.Future[None] | None:
        """Encode and buffer one message; returns the future of its durability, or None when
        the message is not stored (excluded, replayed) and may be acknowledged at once."""
        time_ns = self._timestamp()
        self._count_received()
        if self._discovery.is_config_topic(topic):
            self._apply_discovery(topic, payload)
            if not self._include.matches(topic):
                return None
        if self._exclude and self._exclude.matches(topic):
            self._telemetry.dropped("excluded_topic", intentional=True)
            return None
        if self._replays.is_replay(topic, payload, retained):
            self._telemetry.dropped("retained_replay", intentional=True)
            return None
        if qos and self._redeliveries.seen(topic, payload, redelivery):
            self._telemetry.dropped("duplicate_redelivery", intentional=True)
            return None
        line = self._encoder.encode(topic, payload, qos, retained, time_ns)
        accepted = self._last_accepted = self._buffer.add(line)
        if self._buffer.full() and not self._paused:
            self._pause_reading()
        return accepted

    def _count_received(self) -> None:
        # A Prometheus counter takes a lock per inc(); count locally and publish the sum
        # within a tenth of a second instead.
        self._uncounted += 1
        if self._uncounted == 1:
            asyncio.get_running_loop().call_later(0.1, self._publish_count)

    def _publish_count(self) -> None:
        self._received.inc(self._uncounted)
        self._uncounted = 0

    async def _acknowledge_accepted(self) -> None:
        """Shutdown: stop reading and wait until what was accepted is durable, so that its
        acknowledgements leave before the DISCONNECT; else the broker would send those
        messages again to the next run, which would store them twice."""
        transport = self._transport()
        if transport is not None:
            transport.pause_reading()
        last = self._last_accepted
        if last is not None and not last.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(last), _ACK_ON_SHUTDOWN_TIMEOUT)
        await asyncio.sleep(0)  # the acknowledgements go out from the future's callbacks

    def _transport(self) -> asyncio.Transport | None:
        connection = getattr(self._connection_client, "_connection", None)
        transport: asyncio.Transport | None = getattr(connection, "_transport", None)
        return transport

    def _pause_reading(self) -> None:
        """Back-pressure: stop reading the socket until the buffer has room. The broker then
        holds unacknowledged QoS 1/2 messages (and queues QoS 0 within its limits)."""
        transport = self._transport()
        if transport is None:
            return
        self._paused = True
        transport.pause_reading()
        self._telemetry.metrics.queue_depth.labels("mqtt_paused").set(1)

        async def resume() -> None:
            try:
                await self._buffer.wait_for_room()
            finally:
                self._paused = False
                self._telemetry.metrics.queue_depth.labels("mqtt_paused").set(0)
                if not transport.is_closing():
                    transport.resume_reading()

        self._resume_task = asyncio.create_task(resume(), name="mqtt-resume-reading")

    def _apply_discovery(self, topic: str, payload: bytes) -> None:
        try:
            changed = self._discovery.update(topic, payload)
        except (ValueError, TypeError) as exc:
            self._telemetry.invalid(TARGET, "invalid_discovery_config", topic=topic, error=str(exc))
            return
        if changed:
            self._encoder.discovery_changed()


async def _close(client: Any) -> None:
    with contextlib.suppress(Exception):  # the connection is being dropped anyway
        await asyncio.wait_for(client.disconnect(), 2.0)
