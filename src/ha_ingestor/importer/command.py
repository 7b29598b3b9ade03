"""``ha-ingestor import``: connect, plan, import through a spool and the writer, summarise.

Beside a running service. The import has a spool of its own, ``<HA_INGESTOR_SPOOL_DIR>/import``
(its own SQLite file, writer, dead-letter file and checkpoints). Sharing the service's spool file
is not safe: a spool loads the groups it finds when it opens and treats every row as its own to
replay and delete, so two processes on one file would each write the other's leftovers and
keep their own counts of it. A lock file keeps a second import off the import spool.

Where the import ends. Without ``--until``, the states end at the service's checkpoint
(``homeassistant.last_event`` in the service's spool, read without opening it for writing):
everything up to it is durable, and the service stores (or back-fills after a restart)
everything after it. When no service ever ran there, they end now. The last point of the
import and the first one of the service may be the same change: it is the same point (same
series, same µs), so InfluxDB keeps one. Statistics end now (or at ``--until``): the service
does not write ``ha_statistics``; a rerun of the import brings them up to date.

Exit status: 0 when everything asked for was written or is durable in the import spool (the
next import writes what is left first), 1 when the import stopped early (a rerun resumes) or,
with the spool switched off, when lines were left unwritten; 2 for a configuration or option
error; 130 when interrupted (what was read is durable, a rerun resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import TextIO

import aiohttp
from prometheus_client import CollectorRegistry

from ha_ingestor.config import Settings
from ha_ingestor.errors import describe
from ha_ingestor.importer.job import BufferSink, CountingSink, Importer, Sink, Summary
from ha_ingestor.importer.options import ImportOptionError, ImportOptions
from ha_ingestor.importer.progress import ImportProgress, progress_for
from ha_ingestor.pipeline.buffer import Buffer, Checkpoints, MemoryBuffer, MemoryCheckpoints
from ha_ingestor.pipeline.columns import ColumnBudgets, promoted_budget
from ha_ingestor.pipeline.ha_events import (
    STATE_FIXED_COLUMNS,
    STATE_MEASUREMENT,
    format_time_ns,
    parse_time_ns,
)
from ha_ingestor.pipeline.ha_statistics import StatisticsMapper
from ha_ingestor.pipeline.spool import IMPORT_SPOOL, SpoolError, SqliteSpool, read_checkpoint
from ha_ingestor.sinks.dead_letter import DEAD_LETTER_FILE, DeadLetterFile
from ha_ingestor.sinks.influxdb import InfluxClient
from ha_ingestor.sinks.writer import InfluxWriter
from ha_ingestor.sources.ha_client import AuthInvalidError, CommandError, HomeAssistantClient
from ha_ingestor.sources.ha_registry import Registries
from ha_ingestor.sources.homeassistant import CHECKPOINT_KEY as LIVE_CHECKPOINT_KEY
from ha_ingestor.sources.homeassistant import INSTANCE_KEY as LIVE_INSTANCE_KEY
from ha_ingestor.sources.homeassistant import event_mapper
from ha_ingestor.telemetry import Telemetry
from ha_ingestor.tls import ha_tls_context

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
_LOCK_FILE = "import.lock"
_CALL_TIMEOUT = 120.0  # one history window; windows are sized to take a few seconds


class ImportAbortedError(Exception):
    """The import cannot start or go on; the message says what to fix."""


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / _LOCK_FILE).open("a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImportAbortedError(
                f"another import is running on {directory} (HA_INGESTOR_SPOOL_DIR): wait for "
                "it to finish, or give this one a different HA_INGESTOR_SPOOL_DIR"
            ) from None
        yield


@contextlib.asynccontextmanager
async def _buffer(
    settings: Settings, telemetry: Telemetry, dry_run: bool
) -> AsyncIterator[tuple[Buffer, Checkpoints | None]]:
    if dry_run:
        yield MemoryBuffer(), None
        return
    if not settings.spool_enabled:
        yield MemoryBuffer(), MemoryCheckpoints()
        return
    directory = settings.spool_dir / IMPORT_SPOOL
    with _exclusive(directory):
        spool = SqliteSpool(
            directory,
            telemetry,
            max_bytes=settings.spool_max_bytes,
            overflow=settings.spool_overflow,
            commit_interval=settings.spool_commit_interval,
        )
        async with spool:
            yield spool, spool


def live_checkpoint_ns(settings: Settings) -> int | None:
    """Where the service's stored stream stands (None: no service spool, or no event yet)."""
    if not settings.spool_enabled:
        return None
    value = read_checkpoint(settings.spool_dir, LIVE_CHECKPOINT_KEY)
    return parse_time_ns(value) if value else None


async def _connect(client: HomeAssistantClient, settings: Settings) -> None:
    try:
        await client.__aenter__()
    except AuthInvalidError as exc:
        raise ImportAbortedError(
            f"Home Assistant rejected HA_INGESTOR_HA_TOKEN (auth_invalid: {exc}). Create a new "
            "long-lived access token (profile page → Security)."
        ) from None
    except (OSError, TimeoutError, ValueError) as exc:
        raise ImportAbortedError(
            f"cannot reach Home Assistant at HA_INGESTOR_HA_URL={settings.ha_url}: {describe(exc)}"
        ) from None


async def _require_admin(client: HomeAssistantClient) -> None:
    user = await client.call("auth/current_user")
    if not isinstance(user, dict) or not user.get("is_admin"):
        name = user.get("name") if isinstance(user, dict) else None
        raise ImportAbortedError(
            f"HA_INGESTOR_HA_TOKEN belongs to {name or 'a user'!s}, who is not an "
            "administrator: reading the whole recorder and the registries needs an "
            "administrator's long-lived access token"
        )


async def _wait_written(
    buffer: Buffer, writer_task: asyncio.Task[None], stall_timeout: float
) -> None:
    """Until the buffer is empty, or nothing was written for ``stall_timeout`` seconds."""
    loop = asyncio.get_running_loop()
    last_depth = buffer.depth()[0]
    progressed = loop.time()
    while last_depth and not writer_task.done():
        await asyncio.sleep(0.1)
        depth = buffer.depth()[0]
        if depth < last_depth:
            progressed = loop.time()
        elif loop.time() - progressed > stall_timeout:
            return
        last_depth = depth


async def run_import(
    settings: Settings,
    options: ImportOptions,
    *,
    out: TextIO = sys.stdout,
    progress: ImportProgress | None = None,
    registry: CollectorRegistry | None = None,
) -> int:
    telemetry = Telemetry(registry or CollectorRegistry())
    log = telemetry.log
    if settings.ha_url is None or settings.ha_token is None:
        print(
            "ha-ingestor import: HA_INGESTOR_HA_URL and HA_INGESTOR_HA_TOKEN must both be set",
            file=sys.stderr,
        )
        return EXIT_USAGE
    began = time.monotonic()
    now_ns = time.time_ns() // 1000 * 1000
    try:
        live_ns = live_checkpoint_ns(settings)
    except SpoolError as exc:
        print(f"ha-ingestor import: HA_INGESTOR_SPOOL_DIR: {exc}", file=sys.stderr)
        return EXIT_USAGE
    states_until = options.until_ns
    if states_until is None:
        states_until = min(live_ns, now_ns) if live_ns is not None else now_ns
    statistics_until = options.until_ns if options.until_ns is not None else now_ns
    log.info(
        "import starting",
        since=format_time_ns(options.since_ns),
        states_until=format_time_ns(states_until),
        until_source="--until"
        if options.until_ns is not None
        else ("service checkpoint" if live_ns is not None else "now"),
        entities=",".join(options.entity_globs) or "all",
        states=options.states,
        statistics=options.statistics,
        dry_run=options.dry_run,
    )
    if options.states and states_until <= options.since_ns:
        log.info("states already stored by the service", since=format_time_ns(options.since_ns))
    progress = progress or progress_for()
    try:
        async with (
            aiohttp.ClientSession() as influx_session,
            _buffer(settings, telemetry, options.dry_run) as (buffer, checkpoints),
        ):
            if options.dry_run:
                summary, sink = await _connected_import(
                    settings,
                    options,
                    buffer,
                    None,
                    telemetry,
                    progress,
                    states_until,
                    statistics_until,
                )
                _print_counts(sink, out)
                _print_summary(summary, telemetry, began, 0, options, out)
                return EXIT_OK
            # The writer drains the import's spool while the import reads.
            # A bulk job: batches fill at once, and the last one need not wait for a flush.
            writer_settings = settings.model_copy(
                update={"influx_flush_interval": min(settings.influx_flush_interval, 0.1)}
            )
            writer = InfluxWriter(
                writer_settings,
                InfluxClient(settings, influx_session),
                buffer,
                telemetry,
                DeadLetterFile(settings.spool_dir / IMPORT_SPOOL / DEAD_LETTER_FILE),
            )
            writer_task = asyncio.create_task(writer.run(), name="import-writer")
            try:
                summary, _ = await _connected_import(
                    settings,
                    options,
                    buffer,
                    checkpoints,
                    telemetry,
                    progress,
                    states_until,
                    statistics_until,
                )
                unwritten = await _write_out(settings, buffer, writer_task, telemetry)
            finally:
                await writer.stop(0.5)
                writer_task.cancel()
                await asyncio.gather(writer_task, return_exceptions=True)
            _print_summary(summary, telemetry, began, unwritten, options, out)
            if unwritten and not settings.spool_enabled:
                print(
                    f"ha-ingestor import: {unwritten} lines not written, and not durable "
                    "(HA_INGESTOR_SPOOL_ENABLED is false): rerun when InfluxDB takes writes",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            return EXIT_OK
    except ImportOptionError as exc:
        print(f"ha-ingestor import: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportAbortedError as exc:
        print(f"ha-ingestor import: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (CommandError, ConnectionError, TimeoutError, aiohttp.ClientError, OSError) as exc:
        print(
            f"ha-ingestor import: stopped early ({describe(exc)}); what was read is durable "
            "and a rerun with the same options continues from the last finished window",
            file=sys.stderr,
        )
        return EXIT_FAILED


async def _connected_import(
    settings: Settings,
    options: ImportOptions,
    buffer: Buffer,
    checkpoints: Checkpoints | None,
    telemetry: Telemetry,
    progress: ImportProgress,
    states_until: int,
    statistics_until: int,
) -> tuple[Summary, Sink]:
    assert settings.ha_url is not None
    assert settings.ha_token is not None
    client = HomeAssistantClient(
        settings.ha_url,
        settings.ha_token.get_secret_value(),
        ssl_context=ha_tls_context(settings),
        call_timeout=_CALL_TIMEOUT,
    )
    await _connect(client, settings)
    try:
        return await _import(
            client,
            settings,
            options,
            buffer,
            checkpoints,
            telemetry,
            progress,
            states_until,
            statistics_until,
        )
    finally:
        await client.__aexit__(None, None, None)


async def _import(
    client: HomeAssistantClient,
    settings: Settings,
    options: ImportOptions,
    buffer: Buffer,
    checkpoints: Checkpoints | None,
    telemetry: Telemetry,
    progress: ImportProgress,
    states_until: int,
    statistics_until: int,
) -> tuple[Summary, Sink]:
    await _require_admin(client)
    config = await client.call("get_config")
    # The instance the service decided on (kept in its spool), so the series are its series.
    live_instance = None
    if settings.spool_enabled:
        with contextlib.suppress(SpoolError):
            live_instance = read_checkpoint(settings.spool_dir, LIVE_INSTANCE_KEY)
    instance = (
        settings.instance
        or live_instance
        or (
            str(config["location_name"])
            if isinstance(config, dict) and config.get("location_name")
            else socket.gethostname()
        )
    )
    registries = Registries()
    with contextlib.suppress(CommandError):
        await registries.load(client.call)
    # The same mapping, filters and tags as the live source, so the points are the same.
    # The service's ha_state columns count against the import's budget, and the other way round.
    shared = [partial(read_checkpoint, settings.spool_dir)] if settings.spool_enabled else []
    columns = ColumnBudgets(checkpoints or MemoryCheckpoints(), telemetry, shared)
    limit = promoted_budget(settings.influx_max_columns, STATE_FIXED_COLUMNS, len(settings.tags))
    mapper = event_mapper(
        settings, instance, registries.info, columns.budget(STATE_MEASUREMENT, limit)
    )
    statistics_mapper = StatisticsMapper(instance=instance, static_tags=settings.tags)
    sink: Sink = CountingSink() if options.dry_run else BufferSink(buffer, telemetry)
    importer = Importer(
        client.call, mapper, statistics_mapper, sink, checkpoints, progress, telemetry
    )
    saving = asyncio.create_task(columns.run(), name="import-column-budgets")
    try:
        with progress:
            summary = await importer.run(options, states_until, statistics_until)
    finally:
        saving.cancel()  # its last save lands in the import spool's final commit
        await asyncio.gather(saving, return_exceptions=True)
    return summary, sink


async def _write_out(
    settings: Settings, buffer: Buffer, writer_task: asyncio.Task[None], telemetry: Telemetry
) -> int:
    """Wait until the import is written; returns the lines left (durable in the import
    spool) when InfluxDB took nothing for ``HA_INGESTOR_SHUTDOWN_TIMEOUT`` seconds."""
    await buffer.flush()
    await _wait_written(buffer, writer_task, settings.shutdown_timeout)
    await buffer.flush()
    left = buffer.depth()[0]
    if left:
        telemetry.log.warning(
            "import not fully written",
            unwritten_lines=left,
            spool=str(settings.spool_dir / IMPORT_SPOOL),
            influxdb_error=telemetry.connection("influxdb").last_error,
            hint="durable; the next ha-ingestor import writes them first",
        )
    return left


def _metric(telemetry: Telemetry, name: str) -> int:
    value = telemetry.metrics.registry.get_sample_value(name)
    return int(value or 0)


def _print_counts(sink: Sink, out: TextIO) -> None:
    for key, count in sorted(sink.counts.per_key.items()):
        print(f"{count:>10}  {key}", file=out)


def _print_summary(
    summary: Summary,
    telemetry: Telemetry,
    began: float,
    unwritten: int,
    options: ImportOptions,
    out: TextIO,
) -> None:
    took = time.monotonic() - began
    verb = "would import" if options.dry_run else "imported"
    parts = [
        f"{verb} {summary.states} states of {summary.entities} entities",
        f"{summary.statistics} statistics rows of {summary.statistic_ids} statistics",
        f"{_metric(telemetry, 'ha_ingestor_dead_lettered_lines_total')} dead letters",
        f"{summary.unencodable} unencodable",
        f"{unwritten} unwritten (durable in the spool)",
        f"in {took:.1f} s",
    ]
    if summary.states_until_ns is not None:
        parts.append(f"states up to {format_time_ns(summary.states_until_ns)}")
    if summary.resumed:
        parts.append(f"resumed: {', '.join(summary.resumed)}")
    print("; ".join(parts), file=out)
    out.flush()
