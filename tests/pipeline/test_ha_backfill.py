"""The back-fill's bounds, against answers shaped like Home Assistant 2026.11's history."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ha_ingestor.pipeline.buffer import MemoryBuffer
from ha_ingestor.pipeline.ha_backfill import HistoryBackfill
from ha_ingestor.pipeline.ha_events import Mapper, epoch_to_ns
from ha_ingestor.telemetry import Telemetry

pytestmark = pytest.mark.timeout(30)


async def test_the_first_live_change_is_not_back_filled_when_its_float_lies_below_its_microsecond() -> (
    None
):
    """The recorder keeps raw ``time.time()`` floats and compares them with the end bound; a
    float just below the microsecond it is stored at passes ``end_time`` = that microsecond,
    so history returns the first live change too. It is stored live: not a second time."""
    now = time.time()
    start_ns = epoch_to_ns(now - 10)
    live = math.nextafter(round(now, 6), 0.0)  # rounds up to its microsecond
    until_ns = epoch_to_ns(live)
    assert live * 1e9 < until_ns
    gap_row = {"s": "1", "a": {}, "lu": now - 5}
    history = {
        "sensor.t": [{"s": "0", "a": {}, "lu": now - 20}, gap_row, {"s": "2", "a": {}, "lu": live}]
    }

    async def call(command: str, **payload: Any) -> Any:
        return [{"entity_id": "sensor.t"}] if command == "get_states" else history

    buffer = MemoryBuffer()
    backfill = HistoryBackfill(
        call, Mapper(instance="home"), buffer, Telemetry(CollectorRegistry()), max_hours=1
    )
    stored = await backfill.run(start_ns, until_ns, [])
    batch = await buffer.next_batch(10, 0.0)
    assert stored == 1
    assert [line.rsplit(" ", 1)[1] for line in batch.lines] == [str(epoch_to_ns(now - 5))]
