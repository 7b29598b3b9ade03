"""The InfluxDB writer: drains the buffer in batches, a few requests in flight, losing nothing.

Per DESIGN §5, by the :class:`~ha_ingestor.sinks.influxdb.Outcome` of each request:

- ``ok``: the batch is acknowledged to the buffer (and leaves the spool).
- ``retryable`` (429, 5xx, timeouts, refused connections): the same batch is sent again after a
  capped exponential backoff with full jitter, or after ``Retry-After`` if that is longer.
  Nothing is dropped, however long it takes.
- ``partial`` (InfluxDB 3: the good lines are stored, the bad ones listed by number) and
  ``rejected`` (400/422): settled from the answer in one round trip where it names the lines
  (:mod:`~ha_ingestor.sinks.partial_writes`): stored lines are not sent again, refused lines go
  to the dead-letter file with the server's reason, lines that hit a limit are kept. Otherwise
  the batch is bisected until the bad lines are isolated.
- ``too_large`` (413): the batch is split in halves, recursively.
- ``auth`` (401/403), ``config`` (a wrong organisation or retention policy), ``limit`` (InfluxDB
  3's column, table or database limit, a deleted database) and ``not_found``
  (404; on v1 the database is created first and the write retried at once): the batch is kept,
  the connection is marked failed (not ready), an error is logged once per ``auth_log_interval``
  and the write is retried with the same slow backoff — a fixed token resumes writing without
  a restart.

To InfluxDB 1.x and 2.x each batch is sent in series order
(:func:`~ha_ingestor.line_protocol.series_order`): InfluxDB 1.x stores it with less CPU, and
lines of one series keep their order.

A batch is acknowledged only once every line of it is in InfluxDB or in the dead-letter file.
``stop`` lets the loops drain the buffer until a deadline; batches not written by then are
handed back to the buffer (``release``), so they stay in the spool.
"""

from __future__ import annotations

import asyncio
import time
from operator import methodcaller

from ha_ingestor.backoff import Backoff
from ha_ingestor.config import InfluxApi, Settings
from ha_ingestor.line_protocol import series_order
from ha_ingestor.pipeline.buffer import Batch, Buffer
from ha_ingestor.sinks.dead_letter import DEAD_LETTER_FILE, DeadLetterFile
from ha_ingestor.sinks.influxdb import InfluxClient, InfluxUnavailableError, Outcome, WriteResult
from ha_ingestor.sinks.partial_writes import Settlement, settle
from ha_ingestor.telemetry import ConnState, Telemetry

__all__ = ["MEASUREMENTS", "TARGET", "InfluxWriter", "count_measurements"]

TARGET = "influxdb"
#: Measurements counted by name in ``points_written``; anything else counts as "other".
MEASUREMENTS = ("mqtt_message", "ha_state", "ha_event", "ha_statistics")
# Per measurement, a C-level "does this line start with its name and a separator" test.
_STARTS_WITH = {m: methodcaller("startswith", (m + ",", m + " ")) for m in MEASUREMENTS}
_REFUSED = (Outcome.AUTH, Outcome.CONFIG, Outcome.NOT_FOUND, Outcome.LIMIT)


def count_measurements(lines: list[str]) -> dict[str, int]:
    """Lines per measurement (known names, else ``other``), exactly: by each line's prefix."""
    counts: dict[str, int] = {}
    remaining = len(lines)
    for name, starts_with in _STARTS_WITH.items():
        if not remaining:
            break
        found = sum(map(starts_with, lines))
        if found:
            counts[name] = found
            remaining -= found
    if remaining:
        counts["other"] = remaining
    return counts


class InfluxWriter:
    """Runs ``settings.influx_concurrency`` write loops over one buffer (``run``/``stop``)."""

    def __init__(
        self,
        settings: Settings,
        client: InfluxClient,
        buffer: Buffer,
        telemetry: Telemetry,
        dead_letters: DeadLetterFile | None = None,
        *,
        retry_base: float = 0.5,
        retry_cap: float = 30.0,
        auth_log_interval: float = 60.0,
    ) -> None:
        self._settings = settings
        self._client = client
        self._buffer = buffer
        self._telemetry = telemetry
        self.dead_letters = dead_letters or DeadLetterFile(settings.spool_dir / DEAD_LETTER_FILE)
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._auth_log_interval = auth_log_interval
        self._last_refusal_log: float | None = None
        self._refusals_since_log = 0
        self._draining = False
        self._loops: list[asyncio.Task[None]] = []
        self._in_flight = 0  # loops holding a batch
        self._prepared = asyncio.Event()

    def _backoff(self) -> Backoff:
        return Backoff(base=self._retry_base, cap=self._retry_cap)

    # --- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Identify InfluxDB, then write until cancelled (or until ``stop``)."""
        self._telemetry.set_state(TARGET, ConnState.CONNECTING)
        await self._prepare()
        self._loops = [
            asyncio.create_task(self._loop(), name=f"influx-write-{i}")
            for i in range(self._settings.influx_concurrency)
        ]
        try:
            await asyncio.gather(*self._loops)
        finally:
            for task in self._loops:
                task.cancel()

    async def stop(self, grace: float) -> None:
        """Write what is buffered for up to ``grace`` seconds, finishing writes in flight;
        whatever is not written by then stays in the buffer."""
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._prepared.is_set():
            # Polling: "buffer empty and no write in flight" has no single event to wait on.
            while loop.time() < deadline and (self._in_flight or self._buffer.depth()[0]):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._telemetry.set_state(TARGET, ConnState.STOPPED)

    async def _prepare(self) -> None:
        """Identify InfluxDB (and create the v1 database), retrying until it answers."""
        telemetry = self._telemetry
        backoff = self._backoff()
        while True:
            try:
                created = await self._client.prepare()
            except InfluxUnavailableError as exc:
                telemetry.set_state(TARGET, ConnState.RECONNECTING, error=str(exc))
                await asyncio.sleep(backoff.next_delay())
                continue
            break
        client = self._client
        api = client.api or InfluxApi.V1
        if created is not None and created.outcome != Outcome.OK:
            # A user without admin rights may still write to an existing database.
            telemetry.log.warning(
                "influxdb database not created",
                database=client.target,
                error=created.describe(),
            )
        telemetry.log.info(
            "influxdb detected",
            url=client.url,
            api=api.value,
            version=client.version,
            build=client.build,
            target=client.target,
        )
        telemetry.set_state(TARGET, ConnState.CONNECTED)
        self._prepared.set()

    # --- writing ---------------------------------------------------------------------------------
    async def _loop(self) -> None:
        settings = self._settings
        buffer = self._buffer
        backoff = self._backoff()
        while True:
            max_wait = 0.0 if self._draining else settings.influx_flush_interval
            batch = await buffer.next_batch(settings.influx_batch_size, max_wait)
            self._in_flight += 1
            try:
                lines = self._in_write_order(batch.lines)
                # A batch holds whole groups, and one group may hold more lines than a request
                # may carry (in a burst, all that arrived during the previous commit).
                size = settings.influx_batch_size
                for start in range(0, len(lines), size):
                    await self._write(lines[start : start + size], backoff)
            except asyncio.CancelledError:
                await buffer.release(batch)
                raise
            finally:
                self._in_flight -= 1
            await buffer.ack(batch)
            self._observe(batch)

    def _in_write_order(self, lines: list[str]) -> list[str]:
        # Measured on InfluxDB 1.x; 2.x stores with the same engine (TSM). InfluxDB 3, another
        # engine, gets the lines as they came.
        if self._client.api in (InfluxApi.V1, InfluxApi.V2):
            return series_order(lines)
        return lines

    def _observe(self, batch: Batch) -> None:
        latency = max(0.0, time.time() - batch.oldest_received_at)
        self._telemetry.metrics.end_to_end_latency.observe(latency)

    async def _write(self, lines: list[str], backoff: Backoff) -> None:
        """Write ``lines`` until every one is stored or dead-lettered."""
        telemetry = self._telemetry
        metrics = telemetry.metrics
        client = self._client
        created = False
        while lines:
            body = "\n".join(lines).encode()
            started = time.perf_counter()
            result = await client.write(body)
            metrics.write_duration.observe(time.perf_counter() - started)
            metrics.batch_size.observe(len(lines))
            outcome = result.outcome
            if outcome == Outcome.OK:
                backoff.reset()
                telemetry.set_state(TARGET, ConnState.CONNECTED)
                self._count_written(lines)
                return
            metrics.write_errors.labels(outcome.value).inc()
            if outcome in (Outcome.PARTIAL, Outcome.REJECTED):
                settlement = settle(lines, result)
                if settlement is not None:
                    lines = await self._apply(settlement, result, backoff)
                    continue
            if outcome in (Outcome.PARTIAL, Outcome.REJECTED, Outcome.TOO_LARGE):
                if len(lines) == 1:
                    await self._dead_letter(lines, result.describe(), backoff)
                    return
                middle = len(lines) // 2
                await self._write(lines[:middle], backoff)
                await self._write(lines[middle:], backoff)
                return
            if outcome == Outcome.NOT_FOUND and client.api == InfluxApi.V1 and not created:
                created = True  # once per batch: a 404 that creating does not cure waits
                answer = await client.create_database()
                if answer.outcome == Outcome.OK:
                    telemetry.log.warning("influxdb database created", database=client.target)
                    continue
            await self._wait_after(result, backoff)

    async def _apply(
        self, settlement: Settlement, result: WriteResult, backoff: Backoff
    ) -> list[str]:
        """Count what is stored, dead-letter what is refused; the lines still to write."""
        if settlement.stored:
            self._count_written(settlement.stored)
        by_reason: dict[str, list[str]] = {}
        for line, reason in settlement.refused:
            by_reason.setdefault(reason, []).append(line)
        for reason, refused in by_reason.items():
            await self._dead_letter(refused, reason, backoff)
        if settlement.kept:
            # A limit of the server: a configuration problem, not bad lines. Keep them.
            limit = next(e.message for e in result.line_errors if e.is_limit)
            await self._wait_after(WriteResult(Outcome.LIMIT, result.status, limit), backoff)
        return settlement.kept + settlement.resend

    def _count_written(self, lines: list[str]) -> None:
        metrics = self._telemetry.metrics
        for measurement, count in count_measurements(lines).items():
            metrics.points_written.labels(measurement).inc(count)

    async def _wait_after(self, result: WriteResult, backoff: Backoff) -> None:
        telemetry = self._telemetry
        detail = result.describe()
        if result.outcome == Outcome.LIMIT:
            detail = f"InfluxDB limit reached, lines kept and retried ({detail})"
        if result.outcome in _REFUSED:
            self._log_refusal(result)
            telemetry.set_state(TARGET, ConnState.FAILED, error=detail)
        else:
            telemetry.set_state(TARGET, ConnState.RECONNECTING, error=detail)
        delay = backoff.next_delay()
        if result.retry_after is not None:
            delay = max(delay, min(result.retry_after, 300.0))
        await asyncio.sleep(delay)

    def _log_refusal(self, result: WriteResult) -> None:
        """An error once per ``auth_log_interval`` while InfluxDB refuses writes, not per retry."""
        telemetry = self._telemetry
        now = telemetry.clock()
        self._refusals_since_log += 1
        last = self._last_refusal_log
        if last is not None and now - last < self._auth_log_interval:
            return
        self._last_refusal_log = now
        lines, _ = self._buffer.depth()
        telemetry.error(
            TARGET,
            "influxdb refuses writes; data is kept and retried",
            error=result.describe(),
            kind=result.outcome.value,
            target=self._client.target,
            refusals=self._refusals_since_log,
            waiting_lines=lines,
        )
        self._refusals_since_log = 0

    async def _dead_letter(self, lines: list[str], reason: str, backoff: Backoff) -> None:
        telemetry = self._telemetry
        while True:
            try:
                await self.dead_letters.add(lines, reason)
                break
            except OSError as exc:
                # Never acknowledge a line that is neither in InfluxDB nor on disk.
                telemetry.error(TARGET, "cannot write the dead-letter file", error=str(exc))
                await asyncio.sleep(backoff.next_delay())
        telemetry.metrics.dead_lettered.inc(len(lines))
        telemetry.dropped("rejected_by_influxdb", len(lines), intentional=False)
        telemetry.warn_throttled(
            "dead_letter",
            10.0,
            "line rejected by influxdb, dead-lettered",
            reason=reason,
            line=lines[0][:500],
            file=str(self.dead_letters.path),
        )
