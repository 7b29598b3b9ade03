"""When the spool's group commit runs: soon in a burst, after more lines at a trickle."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ha_ingestor.pipeline.spool import CommitSchedule, SqliteSpool
from ha_ingestor.telemetry import Telemetry

pytestmark = pytest.mark.timeout(30)


async def test_a_burst_is_committed_after_the_minimum_delay() -> None:
    schedule = CommitSchedule(min_delay=0.01, max_delay=5.0, eager_lines=4, burst_gap=10.0)
    schedule.committed()  # commits back to back: lines keep coming
    began = time.monotonic()
    await schedule.wait(lambda: 100, asyncio.Event())
    assert 0.01 <= time.monotonic() - began < 2.0


async def test_enough_lines_after_a_quiet_time_are_committed_at_once() -> None:
    # One hand-off brought them (a coalesced read): waiting would gain no lines, only cost a
    # wake-up. With a minimum delay of 3 s the wait would show.
    schedule = CommitSchedule(min_delay=3.0, max_delay=5.0, eager_lines=4, burst_gap=0.05)
    schedule.committed()
    await asyncio.sleep(0.1)  # longer than the burst gap
    began = time.monotonic()
    await schedule.wait(lambda: 100, asyncio.Event())
    assert time.monotonic() - began < 1.0


async def test_a_trickle_waits_until_enough_lines_are_pending() -> None:
    schedule = CommitSchedule(min_delay=0.001, max_delay=5.0, eager_lines=4)
    pending = [1]
    enough = asyncio.Event()
    waiting = asyncio.create_task(schedule.wait(lambda: pending[0], enough))
    await asyncio.sleep(0.05)  # a moment with one line pending: the commit must keep waiting
    assert not waiting.done()
    pending[0] = 4
    enough.set()
    await asyncio.wait_for(waiting, 2)


async def test_a_trickle_is_committed_after_the_maximum_delay() -> None:
    schedule = CommitSchedule(min_delay=0.001, max_delay=0.05, eager_lines=1000)
    began = time.monotonic()
    await schedule.wait(lambda: 1, asyncio.Event())
    assert 0.05 <= time.monotonic() - began < 2.0


async def test_lines_arriving_slowly_share_one_commit(tmp_path: Path) -> None:
    async with SqliteSpool(tmp_path, Telemetry(CollectorRegistry()), max_commit_delay=2.0) as spool:
        futures = []
        for i in range(16):  # the eager count: the 16th line lets the commit go at once
            futures.append(spool.add(f"m v={i} {i}"))
            await asyncio.sleep(0.005)
        await asyncio.wait_for(asyncio.gather(*futures), 1.5)
        assert all(f is futures[0] for f in futures)  # one group, one commit
        batch = await spool.next_batch(max_lines=100, max_wait=0)
        assert len(batch.group_ids) == 1
        assert len(batch.lines) == 16
