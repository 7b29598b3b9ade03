"""The HTTP server: ``/healthz``, ``/readyz``, ``/metrics``, ``/status`` and the status page."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ha_ingestor import __version__
from ha_ingestor.pipeline.buffer import Buffer
from ha_ingestor.telemetry import Telemetry
from ha_ingestor.web.readiness import Readiness

SAMPLE_INTERVAL = 2.0
SAMPLES_KEPT = 300  # ten minutes of rate history


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class RateHistory:
    """Counter totals sampled every few seconds, turned into per-second rates."""

    def __init__(self, maxlen: int = SAMPLES_KEPT) -> None:
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=maxlen)

    def add(self, now: float, received: float, written: float) -> None:
        self.samples.append((now, received, written))

    def rates(self) -> list[dict[str, float]]:
        out = []
        previous = None
        for sample in self.samples:
            if previous is not None and sample[0] > previous[0]:
                elapsed = sample[0] - previous[0]
                out.append(
                    {
                        "time": sample[0],
                        "received": max(0.0, (sample[1] - previous[1]) / elapsed),
                        "written": max(0.0, (sample[2] - previous[2]) / elapsed),
                    }
                )
            previous = sample
        return out


class HttpServer:
    """Async context manager: serves until exit. ``port`` is the bound port (0 = any free)."""

    def __init__(
        self,
        host: str,
        port: int,
        telemetry: Telemetry,
        buffer: Buffer,
        readiness: Readiness,
        sample_interval: float = SAMPLE_INTERVAL,
    ) -> None:
        self._host = host
        self._port = port
        self._telemetry = telemetry
        self._buffer = buffer
        self._readiness = readiness
        self._sample_interval = sample_interval
        self.history = RateHistory()
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.port = port

    async def __aenter__(self) -> HttpServer:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        # aiohttp exposes the bound sockets (needed for port 0) only on the private server.
        sockets = getattr(site._server, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        self._sampler = asyncio.create_task(self._sample_loop(), name="rate-sampler")
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self._runner is not None:
            await self._runner.cleanup()

    # --- data ----------------------------------------------------------------------------------
    def _sum(self, name: str, label: str | None = None) -> dict[str, float]:
        totals: dict[str, float] = {}
        for metric in self._telemetry.metrics.registry.collect():
            if metric.name != name:
                continue
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    key = sample.labels.get(label, "") if label else ""
                    if label == "reason":
                        key = f"{key} ({'intentional' if sample.labels.get('intentional') == 'true' else 'unintentional'})"
                    totals[key] = totals.get(key, 0.0) + sample.value
        return totals

    def _sample(self) -> None:
        received = sum(self._sum("ha_ingestor_events_received", "source").values())
        written = sum(self._sum("ha_ingestor_points_written", "measurement").values())
        self.history.add(time.time(), received, written)

    async def _sample_loop(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self._sample_interval)

    def status(self) -> dict[str, Any]:
        telemetry = self._telemetry
        lines, size = self._buffer.depth()
        problems = self._readiness.problems()
        return {
            "version": __version__,
            "uptime_seconds": round(telemetry.clock() - telemetry.started_at, 1),
            "ready": not problems,
            "not_ready": problems,
            "connections": {name: c.as_dict() for name, c in telemetry.connections.items()},
            "buffer": {"lines": lines, "bytes": size},
            "counters": {
                "received": self._sum("ha_ingestor_events_received", "source"),
                "written": self._sum("ha_ingestor_points_written", "measurement"),
                "dropped": self._sum("ha_ingestor_events_dropped", "reason"),
                "invalid": self._sum("ha_ingestor_invalid_input", "reason"),
                "write_errors": self._sum("ha_ingestor_write_errors", "kind"),
            },
            "rates": self.history.rates()[-150:],
            "recent_errors": [
                {"time": e.time, "component": e.component, "error": e.error}
                for e in list(telemetry.recent_errors)[-20:]
            ],
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
        metrics = self._telemetry.metrics
        lines = self._buffer.depth()[0]
        metrics.queue_depth.labels("buffer").set(lines)
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, _: web.Request) -> web.Response:
        return _json(self.status())

    async def _page(self, _: web.Request) -> web.Response:
        page = resources.files("ha_ingestor.web").joinpath("status.html").read_bytes()
        return web.Response(body=page, content_type="text/html", charset="utf-8")
