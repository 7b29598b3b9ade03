"""The MQTT source: subscribe to the broker Home Assistant uses and hand every message on.

Lifecycle: one :class:`~ha_ingestor.sources.mqtt_client.MqttConnection` per connection attempt;
when it drops, wait a capped, jittered, exponentially growing delay, connect again and
subscribe again. With ``auto`` the first CONNECT asks for MQTT 5 and a broker that answers
"unsupported protocol version" is spoken to in 3.1.1 from then on.

Delivery: QoS 1/2 messages are acknowledged only after their line is durable (the future of
the buffer's ``add()`` resolved), all acknowledgements of one commit in one write, in arrival
order. With a stable client id and a session expiry the broker keeps queueing while the
ingestor is away; a Receive Maximum of 65535 keeps delayed acknowledgements from throttling
the stream.

Redelivery: when a connection breaks, messages received on it but not yet acknowledged are sent
again by the broker on the next connection of the same session (DUP flag, same packet id). Such
a message whose first copy is durable is acknowledged and not stored twice. This holds within
one process: after a ``kill -9`` the next process knows nothing of the first copies, so
messages that were durable but not acknowledged are stored a second time (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time

from ha_ingestor.backoff import Backoff
from ha_ingestor.config import Settings
from ha_ingestor.errors import describe
from ha_ingestor.pipeline.buffer import Buffer
from ha_ingestor.pipeline.mqtt_discovery import DiscoveryMap, MqttEntityRegistry
from ha_ingestor.pipeline.mqtt_messages import MqttMessageEncoder
from ha_ingestor.sources.mqtt_client import (
    MQTT_5,
    MQTT_311,
    ConnectOptions,
    MqttConnection,
    UnsupportedProtocolVersionError,
    ack_code,
)
from ha_ingestor.telemetry import ConnState, Telemetry
from ha_ingestor.tls import mqtt_tls_context

TARGET = "mqtt"
_CONNECT_TIMEOUT = 10.0
_MAX_CACHED_TOPICS = 100_000
_ACK_ON_SHUTDOWN_TIMEOUT = 2.0
_RECEIVE_MAXIMUM = 65535
# At a trickle, read the socket at most every 100 ms: several messages per wake-up.
_READ_COALESCING = 0.1


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


def subscription_filters(settings: Settings) -> list[str]:
    """``HA_INGESTOR_MQTT_TOPICS``, and the discovery topics when those do not cover them."""
    prefix = settings.mqtt_discovery_prefix
    filters = [*settings.mqtt_topics]
    if not TopicFilters(filters).matches(f"{prefix}/x/y/config"):
        filters += [f"{prefix}/+/+/config", f"{prefix}/+/+/+/config"]
    return filters


async def subscribe(
    connection: MqttConnection, settings: Settings, retain_handling: int
) -> list[str]:
    """Subscribe to :func:`subscription_filters`; the filters. Raises ``PermissionError``
    naming the filters the broker refused."""
    filters = subscription_filters(settings)
    granted = await connection.subscribe(
        filters, settings.mqtt_qos, retain_handling=retain_handling
    )
    refused = [f for f, code in zip(filters, granted, strict=False) if code >= 0x80]
    if refused:
        raise PermissionError(
            f"broker refused the subscription to {', '.join(refused)} (HA_INGESTOR_MQTT_TOPICS, "
            "or the discovery topics): allow this user to read them in the broker's ACL"
        )
    return filters


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


class Acknowledgements:
    """The acknowledgements of one connection, sent only after their message is durable.

    Messages of one buffer commit share one future: their PUBACK/PUBRECs go out together when
    it resolves, in the order the messages came. A message not stored (excluded, replayed)
    is acknowledged right after those before it. :meth:`unacked` tells, per packet id, the
    topic and durability future of every QoS 1/2 message not acknowledged yet: after the
    connection is lost, these are the only messages the broker may send again as redeliveries.

    Per message only ints and existing objects are stored (no tuple): in a burst tens of
    thousands wait here at once, and tuples would make every garbage collection walk them.
    """

    def __init__(self, connection: MqttConnection) -> None:
        self._connection = connection
        self._topics: dict[int, str] = {}  # packet id → topic, of the messages not acknowledged
        self._durable: dict[int, asyncio.Future[None] | None] = {}  # … and their futures
        self._future: asyncio.Future[None] | None = None
        self._queue: list[int] | None = None  # the newest acknowledgements not sent (ack_code)

    def unacked(self) -> dict[int, tuple[str, asyncio.Future[None] | None]]:
        durable = self._durable
        return {packet_id: (topic, durable[packet_id]) for packet_id, topic in self._topics.items()}

    def add(
        self, qos: int, packet_id: int, topic: str, durable: asyncio.Future[None] | None
    ) -> None:
        self._topics[packet_id] = topic
        self._durable[packet_id] = durable
        code = ack_code(qos, packet_id)
        queue = self._queue
        if queue is not None and (durable is None or durable is self._future):
            queue.append(code)
            return
        self._queue = queue = [code]
        self._future = durable
        if durable is None:
            asyncio.get_running_loop().call_soon(self._send, queue, None)
        else:
            durable.add_done_callback(lambda future: self._send(queue, future))

    def _send(self, queue: list[int], durable: asyncio.Future[None] | None) -> None:
        if queue is self._queue:  # the newest queue: later messages start a new one
            self._queue = self._future = None
        if _failed(durable):
            return  # not durable: no acknowledgement, the broker sends them again
        if self._connection.acknowledge(queue):
            topics, futures = self._topics, self._durable
            for code in queue:
                packet_id = code & 0xFFFF
                topics.pop(packet_id, None)
                futures.pop(packet_id, None)


class Redeliveries:
    """Recognises a message the broker sends again after a connection broke: only a message
    received on the previous connection of the same session and not acknowledged there, by
    its packet id (with the DUP flag and the same topic), and only when its first copy is
    durable — or will be: its acknowledgement then waits for that copy's future."""

    def __init__(self) -> None:
        self._previous: dict[int, tuple[str, asyncio.Future[None] | None]] = {}

    def connection_lost(self, acknowledgements: Acknowledgements) -> None:
        # Messages of an older connection still unacknowledged are kept too: the broker
        # sends them again on whichever connection comes next.
        self._previous.update(acknowledgements.unacked())

    def connected(self, session_present: bool) -> None:
        if not session_present:  # a new session: the broker sends nothing again
            self._previous.clear()

    def first_copy(
        self, packet_id: int, topic: str, dup: bool
    ) -> tuple[asyncio.Future[None] | None] | None:
        """For a redelivery, a 1-tuple with the first copy's future (None: acknowledge at
        once); None when the message is to be stored."""
        if not self._previous:
            return None
        # A packet id that comes again is settled either way: a DUP is the first copy's
        # redelivery, anything else means the broker has reused the id.
        entry = self._previous.pop(packet_id, None)
        if entry is None or not dup or entry[0] != topic:
            return None
        durable = entry[1]
        if _failed(durable):
            return None  # the first copy was not stored: store this one
        return (durable,)


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
        self._version = MQTT_311 if settings.mqtt_protocol == "3.1.1" else MQTT_5
        self._ssl = mqtt_tls_context(settings) if settings.mqtt_tls else None
        self._connection: MqttConnection | None = None
        self._acks: Acknowledgements | None = None
        self._paused = False
        self._uncounted = 0
        self._resume_task: asyncio.Task[None] | None = None
        self._last_accepted: asyncio.Future[None] | None = None

    @property
    def encoder(self) -> MqttMessageEncoder:
        return self._encoder

    async def run(self) -> None:
        backoff = Backoff()
        telemetry = self._telemetry
        telemetry.set_state(TARGET, ConnState.CONNECTING)
        while True:
            try:
                connection = await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                telemetry.set_state(TARGET, ConnState.RECONNECTING, error=describe(exc))
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            telemetry.set_state(TARGET, ConnState.CONNECTED)
            try:
                error = await connection.wait_closed()
            except asyncio.CancelledError:
                await self._acknowledge_accepted(connection)
                raise
            finally:
                await connection.close()
                if self._acks is not None:
                    self._redeliveries.connection_lost(self._acks)
            reason = describe(error) if error else "connection lost"
            telemetry.set_state(TARGET, ConnState.RECONNECTING, error=reason)
            await asyncio.sleep(backoff.next_delay())

    def _options(self) -> ConnectOptions:
        settings = self._settings
        persistent = settings.mqtt_session_expiry > 0
        return ConnectOptions(
            host=settings.mqtt_host or "",
            port=settings.effective_mqtt_port,
            client_id=settings.mqtt_client_id,
            version=self._version,
            clean_start=not persistent,
            session_expiry=settings.mqtt_session_expiry,
            receive_maximum=_RECEIVE_MAXIMUM,
            keepalive=settings.mqtt_keepalive,
            username=settings.mqtt_username,
            password=(
                settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
            ),
            ssl=self._ssl,
            timeout=_CONNECT_TIMEOUT,
            read_coalescing=_READ_COALESCING,
        )

    async def _open(self) -> MqttConnection:
        # The session is known (on_connack) before any PUBLISH behind the CONNACK is handled.
        connection = self._connection = MqttConnection(
            self._options(), self._on_publish, on_connack=self._redeliveries.connected
        )
        self._acks = Acknowledgements(connection)
        self._paused = False
        await connection.connect()
        return connection

    async def _connect(self) -> MqttConnection:
        settings = self._settings
        try:
            connection = await self._open()
        except UnsupportedProtocolVersionError:
            if settings.mqtt_protocol != "auto" or self._version == MQTT_311:
                raise
            self._version = MQTT_311
            self._telemetry.log.warning("mqtt protocol fallback", protocol="3.1.1")
            connection = await self._open()
        try:
            await self._subscribe(connection)
        except BaseException:
            connection.abort()
            raise
        return connection

    async def _subscribe(self, connection: MqttConnection) -> None:
        settings = self._settings
        # retain_handling 1: the broker sends retained messages only for a new subscription,
        # so a resumed persistent session does not replay them.
        filters = await subscribe(connection, settings, retain_handling=1)
        # Connected means subscribed: a message published after readiness must not be missed.
        self._telemetry.log.info(
            "mqtt subscribed",
            filters=filters,
            qos=settings.mqtt_qos,
            client_id=settings.mqtt_client_id,
            protocol="5" if self._version == MQTT_5 else "3.1.1",
        )

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
        self, topic: str, payload: bytes, qos: int, retained: bool, dup: bool, packet_id: int
    ) -> None:
        """One received PUBLISH: stored (or deliberately not), then acknowledged when due."""
        self._count_received()
        try:
            if qos:
                first = self._redeliveries.first_copy(packet_id, topic, dup)
                if first is not None:
                    self._telemetry.dropped("duplicate_redelivery", intentional=True)
                    durable = first[0]
                else:
                    durable = self._store(topic, payload, qos, retained)
                acks = self._acks
                assert acks is not None
                acks.add(qos, packet_id, topic, durable)
            else:
                self._store(topic, payload, qos, retained)
        except Exception as exc:  # one bad message must not stop the stream
            self._telemetry.dropped("unhandled_message", intentional=False)
            self._telemetry.error(TARGET, "mqtt message not handled", error=describe(exc))
            # Not acknowledged: the broker sends it again after the next reconnect.

    def _store(
        self, topic: str, payload: bytes, qos: int, retained: bool
    ) -> asyncio.Future[None] | None:
        """Encode and buffer one message; the future of its durability, or None when it is
        not stored (excluded, replayed) and may be acknowledged at once."""
        time_ns = self._timestamp()
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
        line = self._encoder.encode(topic, payload, qos, retained, time_ns)
        accepted = self._last_accepted = self._buffer.add(line)
        if not self._paused and self._buffer.full():
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

    async def _acknowledge_accepted(self, connection: MqttConnection) -> None:
        """Shutdown: stop reading and wait until what was accepted is durable, so that its
        acknowledgements leave before the DISCONNECT; else the broker would send those
        messages again to the next run, which would store them twice."""
        connection.pause_reading()
        last = self._last_accepted
        if last is not None and not last.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(last), _ACK_ON_SHUTDOWN_TIMEOUT)
        await asyncio.sleep(0)  # the acknowledgements go out from the future's callbacks

    def _pause_reading(self) -> None:
        """Back-pressure: stop reading the socket until the buffer has room. The broker then
        holds unacknowledged QoS 1/2 messages (and queues QoS 0 within its limits)."""
        connection = self._connection
        if connection is None:
            return
        self._paused = True
        connection.pause_reading()
        self._telemetry.metrics.queue_depth.labels("mqtt_paused").set(1)

        async def resume() -> None:
            try:
                await self._buffer.wait_for_room()
            finally:
                if self._connection is connection:
                    self._paused = False
                self._telemetry.metrics.queue_depth.labels("mqtt_paused").set(0)
                connection.resume_reading()

        self._resume_task = asyncio.create_task(resume(), name="mqtt-resume-reading")

    def _apply_discovery(self, topic: str, payload: bytes) -> None:
        try:
            changed = self._discovery.update(topic, payload)
        except (ValueError, TypeError) as exc:
            self._telemetry.invalid(TARGET, "invalid_discovery_config", topic=topic, error=str(exc))
            return
        if changed:
            self._encoder.discovery_changed()


def _failed(future: asyncio.Future[None] | None) -> bool:
    """Whether ``future`` ended without its line becoming durable."""
    return (
        future is not None
        and future.done()
        and (future.cancelled() or future.exception() is not None)
    )
