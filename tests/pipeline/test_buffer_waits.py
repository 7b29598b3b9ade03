"""Waiting for a buffer's events: a wait that is cancelled stays cancelled."""

from __future__ import annotations

import asyncio

import pytest

from ha_ingestor.pipeline.buffer import MemoryBuffer, wait_event

pytestmark = pytest.mark.timeout(30)


async def test_a_cancellation_arriving_as_the_event_is_set_is_not_swallowed() -> None:
    """The moment a writer is cancelled at shutdown while another hands a batch back: the
    event is set and the cancellation follows before the waiter runs. ``asyncio.wait_for`` on
    Python 3.11 returns normally then, and the writer's loop never ended."""
    raced = 0
    for yields in range(4):  # the cancellation comes 0, 1, 2 or 3 loop turns after the event
        event = asyncio.Event()
        waiter = asyncio.create_task(wait_event(event, 10.0))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        event.set()
        for _ in range(yields):
            await asyncio.sleep(0)
        if waiter.done():
            continue
        raced += 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert raced > 0, "the race was never set up"


async def test_wait_event_returns_when_set_and_after_its_time() -> None:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await wait_event(event, 0.05)
    assert loop.time() - began >= 0.05
    event.set()
    await asyncio.wait_for(wait_event(event, None), 1.0)


async def test_a_writer_waiting_for_a_batch_stops_when_cancelled() -> None:
    buffer = MemoryBuffer()
    waiting = asyncio.create_task(buffer.next_batch(10, 60.0))
    await asyncio.sleep(0.01)
    buffer.add("m f=1 1")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
