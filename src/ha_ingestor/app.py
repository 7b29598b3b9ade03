"""Wiring: the one place where sources, pipeline, spool, writer and HTTP server meet.

Start-up order: spool (replays what an earlier run left) → writer → HTTP server → sources.
Shutdown order (SIGTERM/SIGINT): sources stop → the spool commits what they handed over →
the writer drains until the deadline → everything not yet written stays in the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from ha_ingestor.config import Settings
from ha_ingestor.pipeline.buffer import Buffer, Checkpoints, MemoryBuffer, MemoryCheckpoints
from ha_ingestor.pipeline.columns import ColumnBudgets, promoted_budget
from ha_ingestor.pipeline.ha_events import STATE_FIXED_COLUMNS, STATE_MEASUREMENT
from ha_ingestor.pipeline.mqtt_messages import FIXED_COLUMNS as MQTT_FIXED_COLUMNS
from ha_ingestor.pipeline.mqtt_messages import MEASUREMENT as MQTT_MEASUREMENT
from ha_ingestor.pipeline.spool import IMPORT_SPOOL, SqliteSpool, read_checkpoint
from ha_ingestor.sinks.dead_letter import DeadLetterFile
from ha_ingestor.sinks.influxdb import InfluxClient
from ha_ingestor.sinks.writer import InfluxWriter
from ha_ingestor.sources.mqtt import MqttSource
from ha_ingestor.telemetry import ConnState, Telemetry
from ha_ingestor.tls import influx_tls_context
from ha_ingestor.web.readiness import Readiness
from ha_ingestor.web.server import HttpServer


def default_instance(settings: Settings) -> str:
    return settings.instance or socket.gethostname()


@contextlib.asynccontextmanager
async def open_buffer(
    settings: Settings, telemetry: Telemetry
) -> AsyncIterator[tuple[Buffer, Checkpoints]]:
    if not settings.spool_enabled:
        yield MemoryBuffer(), MemoryCheckpoints()
        return
    spool = SqliteSpool(
        settings.spool_dir,
        telemetry,
        max_bytes=settings.spool_max_bytes,
        overflow=settings.spool_overflow,
        min_free_bytes=settings.spool_min_free_bytes,
        commit_interval=settings.spool_commit_interval,
    )
    async with spool:
        yield spool, spool


class Service:
    """One running HA Ingestor. ``run()`` returns when ``stop()`` is called (or a signal)."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.telemetry = Telemetry(registry)
        self._stop = asyncio.Event()
        self.http_port: int | None = None
        self.ready = asyncio.Event()  # set once every component has started
        self.sources: dict[str, Any] = {}

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        settings = self.settings
        telemetry = self.telemetry
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        telemetry.log.info(
            "starting",
            mqtt=settings.mqtt_enabled,
            homeassistant=settings.ha_enabled,
            influx_url=settings.influx_url,
            spool=settings.spool_enabled,
        )
        connector = aiohttp.TCPConnector(
            ssl=influx_tls_context(settings),
            limit=settings.influx_concurrency + 4,
        )
        async with (
            aiohttp.ClientSession(connector=connector) as influx_session,
            open_buffer(settings, telemetry) as (buffer, checkpoints),
        ):
            client = InfluxClient(settings, influx_session)
            writer = InfluxWriter(settings, client, buffer, telemetry)
            readiness = Readiness(settings, telemetry, buffer)
            # ``ha-ingestor import`` writes ha_state from a spool of its own: its columns count.
            shared = [partial(read_checkpoint, settings.spool_dir / IMPORT_SPOOL)]
            columns = ColumnBudgets(
                checkpoints, telemetry, shared if settings.spool_enabled else []
            )
            instance = await self._instance(settings, checkpoints)
            sources = self.sources = self._sources(
                settings, buffer, columns, checkpoints, instance, writer.dead_letters
            )
            async with HttpServer(
                settings.http_host, settings.http_port, telemetry, buffer, readiness
            ) as http:
                self.http_port = http.port
                writer_task = asyncio.create_task(writer.run(), name="influx-writer")
                source_tasks = [
                    asyncio.create_task(source.run(), name=f"source-{name}")
                    for name, source in sources.items()
                ]
                # Stopped with the sources: its last save lands in the spool's final commit.
                source_tasks.append(asyncio.create_task(columns.run(), name="column-budgets"))
                self.ready.set()
                telemetry.log.info("started", http_port=http.port)
                stop_wait = asyncio.create_task(self._stop.wait(), name="stop-signal")
                done, _ = await asyncio.wait(
                    [stop_wait, writer_task, *source_tasks], return_when=asyncio.FIRST_COMPLETED
                )
                crashed = [t for t in done if t is not stop_wait and not t.cancelled()]
                await self._shutdown(source_tasks, writer, writer_task, buffer)
                stop_wait.cancel()
                for task in crashed:
                    task.result()  # a component that ended on its own is a bug: surface it

    async def _instance(self, settings: Settings, checkpoints: Checkpoints) -> str:
        if not settings.ha_enabled:
            return default_instance(settings)
        from ha_ingestor.sources.homeassistant import decide_instance

        return await decide_instance(settings, checkpoints)

    def _sources(
        self,
        settings: Settings,
        buffer: Buffer,
        columns: ColumnBudgets,
        checkpoints: Checkpoints,
        instance: str,
        dead_letters: DeadLetterFile,
    ) -> dict[str, Any]:
        sources: dict[str, Any] = {}
        static_tags = len(settings.tags)
        registry = None
        if settings.ha_enabled:
            from ha_ingestor.sources.homeassistant import HomeAssistantSource

            homeassistant = HomeAssistantSource(
                settings,
                buffer,
                self.telemetry,
                checkpoints,
                instance,
                columns=columns.budget(
                    STATE_MEASUREMENT,
                    promoted_budget(settings.influx_max_columns, STATE_FIXED_COLUMNS, static_tags),
                ),
                dead_letters=dead_letters,  # one file, shared with the writer
            )
            registry = homeassistant.registries  # names MQTT-discovered entities
            sources["homeassistant"] = homeassistant
        if settings.mqtt_enabled:
            mqtt = MqttSource(settings, buffer, self.telemetry, instance, registry)
            limit = promoted_budget(settings.influx_max_columns, MQTT_FIXED_COLUMNS, static_tags)
            mqtt.encoder.limit_columns(columns.budget(MQTT_MEASUREMENT, limit))
            sources["mqtt"] = mqtt
        return sources

    async def _shutdown(
        self,
        source_tasks: list[asyncio.Task[None]],
        writer: InfluxWriter,
        writer_task: asyncio.Task[None],
        buffer: Buffer,
    ) -> None:
        telemetry = self.telemetry
        deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout
        telemetry.log.info("stopping", timeout=self.settings.shutdown_timeout)
        for task in source_tasks:
            task.cancel()
        await asyncio.gather(*source_tasks, return_exceptions=True)
        for target in ("mqtt", "homeassistant"):
            if target in telemetry.connections:
                telemetry.set_state(target, ConnState.STOPPED)
        await buffer.flush()
        remaining = max(0.5, deadline - asyncio.get_running_loop().time() - 0.5)
        await writer.stop(remaining)
        writer_task.cancel()
        await asyncio.gather(writer_task, return_exceptions=True)
        lines, size = buffer.depth()
        telemetry.log.info("stopped", unwritten_lines=lines, unwritten_bytes=size)


async def run(settings: Settings) -> int:
    """The service as a process of its own (``ha-ingestor run``)."""
    service = Service(settings)
    ready = asyncio.create_task(service.ready.wait(), name="freeze-start-up-heap")
    ready.add_done_callback(_freeze_start_up_heap)
    try:
        await service.run()
    finally:
        ready.cancel()
    return 0


def _freeze_start_up_heap(ready: asyncio.Task[Any]) -> None:
    """Once started, move what start-up made (modules, classes, settings: about 100k objects
    that live as long as the process) out of the garbage collector's sight. Otherwise every
    full collection walks them again: in a burst that was a tenth of the ingestor's CPU."""
    if not ready.cancelled():
        gc.collect()
        gc.freeze()


async def check(settings: Settings) -> bool:
    """Reach every configured endpoint and print one line per target."""
    from ha_ingestor.checks import run_checks

    return await run_checks(settings)
