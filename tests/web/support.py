"""Helpers for the HTTP server tests: settings, a running server, a client, headless Chromium,
a PNG reader."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ha_ingestor.config import Settings, load_settings
from ha_ingestor.pipeline.buffer import Buffer, MemoryBuffer
from ha_ingestor.telemetry import Telemetry
from ha_ingestor.web.readiness import Readiness
from ha_ingestor.web.server import HttpServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason="chromium is installed by scripts/bootstrap"
)

MQTT_ONLY = {"HA_INGESTOR_MQTT_HOST": "broker", "HA_INGESTOR_INFLUX_URL": "http://db:8086"}
BOTH_SOURCES = {
    **MQTT_ONLY,
    "HA_INGESTOR_HA_URL": "http://ha:8123",
    "HA_INGESTOR_HA_TOKEN": "t0ken-value",
}


def make_settings(base: dict[str, str] = MQTT_ONLY, **extra: str) -> Settings:
    return load_settings({**base, **{f"HA_INGESTOR_{k.upper()}": v for k, v in extra.items()}})


@dataclass
class Served:
    server: HttpServer
    telemetry: Telemetry
    buffer: Buffer
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def get(self, path: str) -> tuple[int, str, str]:
        """Status, body text and content type."""
        async with self.session.get(self.url + path) as response:
            return response.status, await response.text(), response.content_type

    async def get_json(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.url + path) as response:
            return response.status, await response.json()


@contextlib.asynccontextmanager
async def serve(
    settings: Settings | None = None,
    telemetry: Telemetry | None = None,
    buffer: Buffer | None = None,
    sample_interval: float = 2.0,
) -> AsyncIterator[Served]:
    settings = settings or make_settings()
    telemetry = telemetry or Telemetry()
    buffer = buffer or MemoryBuffer()
    readiness = Readiness(settings, telemetry, buffer)
    async with (
        HttpServer("127.0.0.1", 0, telemetry, buffer, readiness, sample_interval) as server,
        aiohttp.ClientSession() as session,
    ):
        yield Served(server, telemetry, buffer, session)


@dataclass
class Image:
    width: int
    height: int
    channels: int
    rows: list[bytes]

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        r, g, b = self.rows[y][x * self.channels : x * self.channels + 3]
        return r, g, b

    def colours(self, step: int = 1) -> set[tuple[int, int, int]]:
        return {
            self.pixel(x, y)
            for y in range(0, self.height, step)
            for x in range(0, self.width, step)
        }

    def count_near(self, colour: tuple[int, int, int], tolerance: int) -> int:
        return sum(
            1
            for y in range(self.height)
            for x in range(self.width)
            if all(abs(a - b) <= tolerance for a, b in zip(self.pixel(x, y), colour, strict=True))
        )


def read_png(data: bytes) -> Image:
    """Decode an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes): enough to check
    a screenshot's size and colours without an imaging library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8, "unsupported bit depth"
    assert colour_type in (2, 6), "not RGB or RGBA"
    assert interlace == 0, "interlaced"
    channels = 3 if colour_type == 2 else 4
    stride = width * channels
    raw = zlib.decompress(idat)
    assert len(raw) == height * (stride + 1), "truncated image data"
    rows: list[bytes] = []
    previous = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        rows.append(
            previous := _unfilter(
                raw[start], raw[start + 1 : start + 1 + stride], previous, channels
            )
        )
    return Image(width, height, channels, rows)


def _unfilter(kind: int, line: bytes, up: bytes, channels: int) -> bytes:
    if kind == 0:
        return line
    if kind == 2:
        return bytes((a + b) & 0xFF for a, b in zip(line, up, strict=True))
    out = bytearray(line)
    for i in range(len(out)):
        left = out[i - channels] if i >= channels else 0
        if kind == 1:
            out[i] = (out[i] + left) & 0xFF
        elif kind == 3:
            out[i] = (out[i] + (left + up[i]) // 2) & 0xFF
        else:  # 4: Paeth
            upper_left = up[i - channels] if i >= channels else 0
            p = left + up[i] - upper_left
            pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - upper_left)
            predictor = left if pa <= pb and pa <= pc else up[i] if pb <= pc else upper_left
            out[i] = (out[i] + predictor) & 0xFF
    return bytes(out)


async def chromium(profile: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1200,900",
        "--virtual-time-budget=8000",
        *args,
        url,
    ]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=90, check=False
    )
