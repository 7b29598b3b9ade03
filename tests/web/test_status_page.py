"""The status page, rendered by headless Chromium against a live server whose numbers move."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ha_ingestor.telemetry import ConnState, Telemetry
from tests.support.waiting import wait_for
from tests.web.support import BOTH_SOURCES, chromium, make_settings, needs_chromium, read_png, serve

HOSTILE = '<img src=x onerror="document.title=1">'  # error text must be shown, never run

pytestmark = [pytest.mark.timeout(120), needs_chromium]


@contextlib.asynccontextmanager
async def activity(telemetry: Telemetry) -> AsyncIterator[None]:
    """Counters that grow at a varying rate, and a Home Assistant link that keeps dropping."""

    async def run() -> None:
        metrics = telemetry.metrics
        telemetry.set_state("mqtt", ConnState.CONNECTED)
        telemetry.set_state("influxdb", ConnState.CONNECTED)
        telemetry.error("influxdb", "influxdb refused the write", error=HOSTILE)
        tick = 0
        while True:
            rate = 400 + 300 * math.sin(tick / 10)
            metrics.events_received.labels("mqtt").inc(rate * 0.05)
            metrics.events_received.labels("homeassistant").inc(5)
            metrics.points_written.labels("mqtt_message").inc(rate * 0.045)
            if tick % 40 == 0:
                telemetry.set_state("homeassistant", ConnState.CONNECTED)
            elif tick % 40 == 30:
                telemetry.set_state("homeassistant", ConnState.RECONNECTING, error=HOSTILE)
            tick += 1
            await asyncio.sleep(0.05)

    task = asyncio.create_task(run(), name="fake-activity")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_status_page_renders_live_data(tmp_path: Path) -> None:
    settings = make_settings(BOTH_SOURCES)
    screenshot = Path(os.environ.get("STATUS_SCREENSHOT", tmp_path / "page.png"))
    async with serve(settings, sample_interval=0.25) as served, activity(served.telemetry):
        await wait_for(lambda: len(served.server.history.rates()) >= 8, timeout=20)
        url = served.url + "/"
        dom = await chromium(tmp_path / "profile-dom", url, "--dump-dom")
        shot = await chromium(tmp_path / "profile-png", url, f"--screenshot={screenshot}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert shot.returncode == 0, shot.stderr[-2000:]

    html = dom.stdout
    assert "<h1>HA Ingestor</h1>" in html
    for name in ("mqtt", "homeassistant", "influxdb"):
        assert f"<td>{name}</td>" in html, f"connection {name} is listed"
    assert '<span class="badge connected">connected</span>' in html
    assert "version 0." in html
    assert "received mqtt" in html
    assert "written mqtt_message" in html
    assert "lines waiting" in html
    assert "% of 1 GiB" in html, "the spool's fill level is shown"
    paths = re.findall(r'<path class="rate" d="(M[^"]+)"', html)
    assert len(paths) == 2, "one line each for received and written"
    for d in paths:
        points = re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", d)
        assert len(points) >= 8
        assert len({y for _, y in points}) > 1, "the rate varies, so the line is not flat"
    assert "&lt;img src=x onerror=" in html, "error text is shown escaped"
    assert "<img" not in html, "error text never becomes markup"

    image = read_png(screenshot.read_bytes())
    assert (image.width, image.height) == (1200, 900)
    colours = image.colours(step=3)
    assert len(colours) > 50, "the page is not blank"
    received_line = (0x2F, 0x6F, 0xDE)  # --received in the light scheme headless uses
    assert image.count_near(received_line, tolerance=40) > 200, "the rate chart is drawn"
