"""The InfluxDB writer: drains the buffer in batches, a few requests in flight, losing nothing.

Per DESIGN §5: retryable answers keep the batch and back off (honouring ``Retry-After``);
a rejected batch is bisected so its good lines land and each bad line goes to the dead-letter
file with the server's reason; 413 splits the batch; 401/403 keep everything, mark the sink
failed (not ready) and retry slowly, so a fixed token resumes writing without a restart.
A batch leaves the buffer only when InfluxDB has it (or it is dead-lettered).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from ha_ingestor.config import InfluxApi, Settings
from ha_ingestor.pipeline.buffer import Batch, Buffer
from ha_ingestor.sinks.dead_letter import DeadLetterFile
from ha_ingestor.sinks.influxdb import InfluxClient, InfluxUnavailableError, Outcome, WriteResult
from ha_ingestor.sources.backoff import Backoff
from ha_ingestor.telemetry import ConnState, Telemetry

TARGET = "influxdb"
_AUTH_LOG_INTERVAL = 60.0


MEASUREMENTS = ("mqtt_message", "ha_state", "ha_event")


def count_measurements(body: str, lines: int) -> dict[str, int]:
    """Points per measurement in a newline-joined batch, counted at C speed (str.count)."""
    counts: dict[str, int] = {}
    for measurement in MEASUREMENTS:
        count = body.count("\n" + measurement + ",") + body.startswith(measurement + ",")
        if count:
            counts[measurement] = count
    other = lines - sum(counts.values())
    if other:
        counts["other"] = other
    return counts


class InfluxWriter:
    def __init__(
        self,
        settings: Settings,
        client: InfluxClient,
        buffer: Buffer,
        telemetry: Telemetry,
        dead_letters: DeadLetterFile | None = None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._buffer = buffer
        self._telemetry = telemetry
        self._dead_letters = dead_letters or DeadLetterFile(
            settings.spool_dir / "dead-letter.jsonl"
        )
        self._backoff = Backoff(base=0.5, cap=30.0)
        self._draining = False
        self._loops: list[asyncio.Task[None]] = []
        self._busy = 0  # loops holding a batch
        self._prepared = asyncio.Event()

    async def run(self) -> None:
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

    async def _prepare(self) -> None:
        """Identify InfluxDB and create the v1 database, retrying until it answers."""
        backoff = Backoff(base=0.5, cap=30.0)
        while True:
            try:
                api = await self._client.prepare()
            except InfluxUnavailableError as exc:
                self._telemetry.set_state(TARGET, ConnState.RECONNECTING, error=str(exc))
                await asyncio.sleep(backoff.next_delay())
                continue
            self._telemetry.log.info(
                "influxdb detected", api=api.value, version=self._client.version
            )
            self._telemetry.set_state(TARGET, ConnState.CONNECTED)
            self._prepared.set()
            return

    async def _loop(self) -> None:
        settings = self._settings
        buffer = self._buffer
        while True:
            max_wait = 0.0 if self._draining else settings.influx_flush_interval
            batch = await buffer.next_batch(settings.influx_batch_size, max_wait)
            self._busy += 1
            try:
                await self._write_all(batch.lines)
            except asyncio.CancelledError:
                await buffer.release(batch)
                raise
            finally:
                self._busy -= 1
            await buffer.ack(batch)
            self._observe(batch)

    def _observe(self, batch: Batch) -> None:
        metrics = self._telemetry.metrics
        metrics.batch_size.observe(len(batch.lines))
        metrics.end_to_end_latency.observe(max(0.0, time.time() - batch.oldest_received_at))

    async def _write_all(self, lines: list[str]) -> None:
        """Write ``lines`` until every one is stored or dead-lettered."""
        telemetry = self._telemetry
        metrics = telemetry.metrics
        body = "\n".join(lines)
        while True:
            started = time.perf_counter()
            result = await self._client.write(body.encode())
            metrics.write_duration.observe(time.perf_counter() - started)
            if result.outcome == Outcome.OK:
                self._backoff.reset()
                telemetry.set_state(TARGET, ConnState.CONNECTED)
                for measurement, count in count_measurements(body, len(lines)).items():
                    metrics.points_written.labels(measurement).inc(count)
                return
            metrics.write_errors.labels(result.outcome.value).inc()
            if result.outcome in (Outcome.REJECTED, Outcome.TOO_LARGE):
                if len(lines) == 1:
                    await self._dead_letter(lines, result)
                    return
                middle = len(lines) // 2
                await self._write_all(lines[:middle])
                await self._write_all(lines[middle:])
                return
            if result.outcome == Outcome.NOT_FOUND and self._client.api == InfluxApi.V1:
                with contextlib.suppress(InfluxUnavailableError):
                    await self._client.create_database()
                    continue
            await self._wait_after(result)

    async def _wait_after(self, result: WriteResult) -> None:
        telemetry = self._telemetry
        if result.outcome in (Outcome.AUTH, Outcome.NOT_FOUND):
            detail = f"HTTP {result.status}: {result.message}".strip()
            if telemetry.connection(TARGET).state != ConnState.FAILED:
                telemetry.error(TARGET, "influxdb refused the write", error=detail)
            else:
                telemetry.warn_throttled(
                    "influx_auth",
                    _AUTH_LOG_INTERVAL,
                    "influxdb still refusing writes",
                    error=detail,
                )
            telemetry.set_state(TARGET, ConnState.FAILED, error=detail)
        else:
            detail = f"HTTP {result.status}: {result.message}" if result.status else result.message
            telemetry.set_state(TARGET, ConnState.RECONNECTING, error=detail)
        delay = self._backoff.next_delay()
        if result.retry_after is not None:
            delay = max(delay, min(result.retry_after, 300.0))
        await asyncio.sleep(delay)

    async def _dead_letter(self, lines: list[str], result: WriteResult) -> None:
        reason = f"HTTP {result.status}: {result.message}"
        await self._dead_letters.add(lines, reason)
        self._telemetry.metrics.dead_lettered.inc(len(lines))
        self._telemetry.dropped("rejected_by_influxdb", len(lines), intentional=False)
        self._telemetry.warn_throttled(
            "dead_letter",
            10.0,
            "line rejected by influxdb, dead-lettered",
            reason=reason,
            line=lines[0][:500],
            file=str(self._dead_letters.path),
        )

    async def stop(self, grace: float) -> None:
        """Write what is buffered for up to ``grace`` seconds; the rest stays in the buffer."""
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._prepared.is_set():
            # Polling: "buffer empty and no write in flight" has no single event to wait on.
            while loop.time() < deadline and (self._busy or self._buffer.depth()[0]):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
