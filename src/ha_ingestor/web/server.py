"""The HTTP server: ``/healthz``, ``/readyz``, ``/metrics``, ``/status`` and the status page.

| path       | answer                                                                   |
|------------|--------------------------------------------------------------------------|
| `/healthz` | 200 ``{"status": "ok"}`` while the event loop answers (liveness)          |
| `/readyz`  | 200 ``{"status": "ready"}``, else 503 with ``not_ready`` reasons by target |
| `/metrics` | Prometheus text exposition of the service's registry                     |
| `/status`  | JSON: connections, buffer, counters, rates, recent errors (the page's data) |
| `/`        | the live status page (one self-contained HTML file)                      |

A background task samples the received and written totals every few seconds; ``/status``
turns the samples into per-second rates for the last few minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from ha_ingestor import __version__
from ha_ingestor.pipeline.buffer import Buffer
from ha_ingestor.telemetry import Telemetry
from ha_ingestor.web.readiness import Readiness

SAMPLE_INTERVAL = 2.0  # seconds between rate samples
RATE_WINDOW = 300.0  # seconds of rate history /status returns
RECENT_ERRORS_SHOWN = 20
SHUTDOWN_TIMEOUT = 2.0  # handlers are quick: idle keep-alive connections need no minute


@dataclass(slots=True, frozen=True)
class _Sample:
    time: float  # wall clock, for the chart's time axis
    monotonic: float  # for the elapsed time between samples
    received: float
    written: float


class RateHistory:
    """Counter totals sampled every few seconds, turned into per-second rates."""

    def __init__(self, window: float = RATE_WINDOW, interval: float = SAMPLE_INTERVAL) -> None:
        self._samples: deque[_Sample] = deque(maxlen=int(window / interval) + 1)

    def add(self, now: float, monotonic: float, received: float, written: float) -> None:
        self._samples.append(_Sample(now, monotonic, received, written))

    def rates(self) -> list[dict[str, float]]:
        """One entry per interval between consecutive samples, oldest first."""
        out = []
        for previous, sample in itertools.pairwise(self._samples):
            elapsed = sample.monotonic - previous.monotonic
            if elapsed <= 0:
                continue
            out.append(
                {
                    "time": round(sample.time, 3),
                    "received": max(0.0, (sample.received - previous.received) / elapsed),
                    "written": max(0.0, (sample.written - previous.written) / elapsed),
                }
            )
        return out


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _by_label(metric: Counter | Gauge, label: str) -> dict[str, float]:
    """Current values of a labelled counter or gauge, summed per value of ``label``."""
    totals: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = sample.labels.get(label, "")
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _total(metric: Counter) -> float:
    return sum(_by_label(metric, "").values())


class HttpServer:
    """Async context manager: serves until exit. After enter, ``port`` is the bound port
    (pass 0 to get any free one)."""

    def __init__(
        self,
        host: str,
        port: int,
        telemetry: Telemetry,
        buffer: Buffer,
        readiness: Readiness,
        sample_interval: float = SAMPLE_INTERVAL,
    ) -> None:
        self.host = host
        self.port = port
        self._telemetry = telemetry
        self._buffer = buffer
        self._readiness = readiness
        self._sample_interval = sample_interval
        self.history = RateHistory(interval=sample_interval)
        self._page_html = b""
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HttpServer:
        self._page_html = resources.files("ha_ingestor.web").joinpath("status.html").read_bytes()
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        runner = self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = int(runner.addresses[0][1])
        self._sampler = asyncio.create_task(self._sample_loop(), name="http-rate-sampler")
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- data ----------------------------------------------------------------------------------
    def sample(self) -> None:
        """Take one rate sample now (the background task calls this every interval)."""
        metrics = self._telemetry.metrics
        self.history.add(
            self._telemetry.clock(),
            time.monotonic(),
            _total(metrics.events_received),
            _total(metrics.points_written),
        )

    async def _sample_loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self._sample_interval)

    def _update_gauges(self) -> tuple[int, int]:
        """Buffer gauges as of now (the spool updates them only when it commits)."""
        metrics = self._telemetry.metrics
        lines, size = self._buffer.depth()
        metrics.queue_depth.labels("buffer").set(lines)
        if self._readiness.settings.spool_enabled:
            metrics.spool_lines.set(lines)
            metrics.spool_bytes.set(size)
        return lines, size

    def status(self) -> dict[str, Any]:
        """What ``/status`` answers."""
        telemetry = self._telemetry
        metrics = telemetry.metrics
        lines, size = self._update_gauges()
        problems = self._readiness.problems()
        now = telemetry.clock()
        return {
            "version": __version__,
            "now": now,
            "started_at": telemetry.started_at,
            "uptime_seconds": round(now - telemetry.started_at, 1),
            "ready": not problems,
            "not_ready": problems,
            "connections": {name: c.as_dict() for name, c in telemetry.connections.items()},
            "buffer": self._buffer_status(lines, size),
            "queues": {  # in-memory queues besides the buffer itself
                k: v for k, v in _by_label(metrics.queue_depth, "queue").items() if k != "buffer"
            },
            "counters": {
                "received": _by_label(metrics.events_received, "source"),
                "written": _by_label(metrics.points_written, "measurement"),
                "dropped": _by_label(metrics.events_dropped, "reason"),
                "invalid": _by_label(metrics.invalid_input, "reason"),
                "write_errors": _by_label(metrics.write_errors, "kind"),
                "dead_lettered": {"lines": _total(metrics.dead_lettered)},
                "backfilled": {"points": _total(metrics.backfilled)},
            },
            "rates": self.history.rates(),
            "recent_errors": [
                {"time": e.time, "component": e.component, "error": e.error}
                for e in list(telemetry.recent_errors)[-RECENT_ERRORS_SHOWN:]
            ],
        }

    def _buffer_status(self, lines: int, size: int) -> dict[str, Any]:
        settings = self._readiness.settings
        storage = self._buffer.storage()
        return {
            "lines": lines,
            "bytes": size,
            "durable": storage.durable,  # false while the spool cannot store (and without one)
            "max_bytes": settings.spool_max_bytes if settings.spool_enabled else None,
            "storage": {
                "state": storage.state,
                "error": storage.error,
                "since": storage.since,
                "advice": storage.advice,
                "free_bytes": storage.free_bytes,
                "min_free_bytes": settings.spool_min_free_bytes if settings.spool_enabled else None,
            },
        }

    # --- handlers --------------------------------------------------------------------------------
    async def _healthz(self, _: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        problems = self._readiness.problems()
        if problems:
            return _json({"status": "not ready", "not_ready": problems}, status=503)
        return _json({"status": "ready"})

    async def _metrics(self, _: web.Request) -> web.Response:
        self._update_gauges()
        body = generate_latest(self._telemetry.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, _: web.Request) -> web.Response:
        return _json(self.status())

    async def _page(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self._page_html,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )
