"""A Home Assistant burst while the spool's disk is full (real Home Assistant, a 6 MB tmpfs):
events are held up to the bound, the rest is left to the back-fill, and afterwards every state
the recorder stored is in the spool, once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ha_ingestor.config import load_settings
from ha_ingestor.pipeline.spool import SqliteSpool
from ha_ingestor.sources.homeassistant import HomeAssistantSource
from ha_ingestor.telemetry import Telemetry
from tests.homeassistant.harness import Line, burst_of_state_changes, parse_line
from tests.support.homeassistant import HomeAssistant
from tests.support.small_disk import fill, small_disk
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.homeassistant, pytest.mark.timeout(300)]

HELD = 100  # the smallest bound allowed: a burst of a few hundred changes goes past it


class Drain:
    """The writer's side: everything that leaves the spool, parsed."""

    def __init__(self, spool: SqliteSpool) -> None:
        self.lines: list[Line] = []
        self.task = asyncio.create_task(self._run(spool))

    async def _run(self, spool: SqliteSpool) -> None:
        while True:
            batch = await spool.next_batch(1000, 0.1)
            self.lines += (parse_line(text) for text in batch.lines)
            await spool.ack(batch)


@contextlib.asynccontextmanager
async def source_on_a_small_disk(
    ha: HomeAssistant, disk: Path
) -> AsyncIterator[tuple[HomeAssistantSource, SqliteSpool, Telemetry, CollectorRegistry]]:
    env = {
        "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:9",  # the test drains the spool itself
        "HA_INGESTOR_HA_URL": ha.url,
        "HA_INGESTOR_HA_TOKEN": ha.token,
        "HA_INGESTOR_HA_BACKFILL_SETTLE": "5",
        "HA_INGESTOR_HA_MAX_HELD_EVENTS": str(HELD),
    }
    registry = CollectorRegistry()
    telemetry = Telemetry(registry)
    async with SqliteSpool(disk / "spool", telemetry) as spool:
        source = HomeAssistantSource(load_settings(env), spool, telemetry, spool)
        task = asyncio.create_task(source.run())
        try:
            yield source, spool, telemetry, registry
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_burst_while_the_disk_is_full_is_held_up_to_the_bound_and_back_filled(
    home_assistant: HomeAssistant, tmp_path: Path
) -> None:
    ha = home_assistant
    prefix = "sensor.diskfull_"
    with small_disk(tmp_path / "disk", "6m") as disk:
        async with source_on_a_small_disk(ha, disk) as (_, spool, telemetry, registry):
            await wait_for(lambda: telemetry.is_connected("homeassistant"), timeout=60)
            drain = Drain(spool)
            since = time.time()
            ballast = fill(disk)  # another program takes the rest of the disk
            await asyncio.to_thread(burst_of_state_changes, ha, "diskfull_during", 4, 100)
            await wait_for(lambda: spool.storage().state == "disk_full", timeout=30)
            assert spool.full()

            def shed() -> float:
                return (
                    registry.get_sample_value(
                        "ha_ingestor_events_dropped_total",
                        {"reason": "ha_events_shed", "intentional": "false"},
                    )
                    or 0.0
                )

            await wait_for(lambda: shed() > 0, timeout=30)
            held = registry.get_sample_value("ha_ingestor_queue_depth", {"queue": "homeassistant"})
            assert held is not None
            assert held <= HELD

            ballast.unlink()  # space is back
            await wait_for(lambda: spool.storage().state == "ok", timeout=30)
            await asyncio.to_thread(burst_of_state_changes, ha, "diskfull_after", 2, 10)
            until = time.time()

            def stored() -> dict[tuple[str, int], set[str]]:
                series: defaultdict[tuple[str, int], set[str]] = defaultdict(set)
                for point in drain.lines:
                    if point.measurement == "ha_state" and point.key[0].startswith(prefix):
                        series[point.key].add(point.series)
                return series

            recorded: set[tuple[str, int]] = set()
            low, high = round(since * 1e6), round(until * 1e6)

            async def agree() -> bool:
                nonlocal recorded
                rows = await asyncio.to_thread(ha.recorded_states, since, prefix)
                recorded = {(e, t) for e, t in rows if low <= t <= high}
                return len(recorded) == 420 and recorded <= set(stored())

            try:
                await wait_for(agree, timeout=120, interval=0.5, message="recorder agreement")
            except TimeoutError:
                missing = sorted(recorded - set(stored()))
                raise AssertionError(
                    f"{len(recorded)} recorded, {len(stored())} stored, "
                    f"missing {len(missing)}: {missing[:5]}"
                ) from None
            drain.task.cancel()
            points = stored()
            assert set(points) == recorded  # nothing stored that the recorder does not have
            # Held live and back-filled points of one change are one series and time: once.
            assert all(len(series) == 1 for series in points.values())
            assert shed() > 0
