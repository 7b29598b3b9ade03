import asyncio
import sqlite3
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ha_ingestor.config import OverflowPolicy
from ha_ingestor.pipeline.spool import SPOOL_FILE, SqliteSpool
from ha_ingestor.telemetry import Telemetry


def _telemetry() -> Telemetry:
    return Telemetry(CollectorRegistry())


def _dropped(telemetry: Telemetry, reason: str) -> float:
    value = telemetry.metrics.registry.get_sample_value(
        "ha_ingestor_events_dropped_total", {"reason": reason, "intentional": "true"}
    )
    return value or 0.0


async def test_lines_are_durable_when_their_future_resolves_and_replay_after_reopen(
    tmp_path: Path,
) -> None:
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        futures = [spool.add(f"m,t=a v={i} {i}") for i in range(1000)]
        await asyncio.gather(*futures)
        assert spool.depth()[0] == 1000
    # A new process: everything is read back from disk, oldest first.
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        assert spool.depth()[0] == 1000
        batch = await spool.next_batch(max_lines=400, max_wait=0)
        assert batch.replayed
        assert batch.lines[0] == "m,t=a v=0 0"
        lines = list(batch.lines)
        await spool.ack(batch)
        while spool.depth()[0]:
            batch = await spool.next_batch(max_lines=400, max_wait=0)
            lines += batch.lines
            await spool.ack(batch)
    assert lines == [f"m,t=a v={i} {i}" for i in range(1000)]
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        assert spool.depth() == (0, 0)


async def test_unacknowledged_batch_stays_for_the_next_start(tmp_path: Path) -> None:
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        await spool.add("m v=1 1")
        batch = await spool.next_batch(max_lines=10, max_wait=0)
        assert batch.lines == ["m v=1 1"]  # taken by a writer, never acknowledged
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        assert (await spool.next_batch(max_lines=10, max_wait=0)).lines == ["m v=1 1"]


async def test_next_batch_waits_for_size_or_age(tmp_path: Path) -> None:
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        await spool.add("m v=1 1")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(spool.next_batch(max_lines=10, max_wait=5), 0.2)
        batch = await asyncio.wait_for(spool.next_batch(max_lines=10, max_wait=0.3), 2)
        assert batch.lines == ["m v=1 1"]


async def test_checkpoints_survive_a_restart(tmp_path: Path) -> None:
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        await spool.save("homeassistant.last_event", "2026-11-22T10:00:00.123456+00:00")
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        assert spool.load("homeassistant.last_event") == "2026-11-22T10:00:00.123456+00:00"
        assert spool.load("missing") is None


async def _fill(spool: SqliteSpool, groups: int, per_group: int) -> None:
    for g in range(groups):
        await asyncio.gather(*(spool.add(f"m,g={g} v={i} {i}") for i in range(per_group)))


async def test_drop_oldest_evicts_whole_old_groups_and_counts_them(tmp_path: Path) -> None:
    telemetry = _telemetry()
    cap = 1024 * 1024
    per_group = 1000
    groups = 150  # about 1.7 MiB of lines
    async with SqliteSpool(tmp_path, telemetry, max_bytes=cap) as spool:
        await _fill(spool, groups, per_group)
        lines, size = spool.depth()
        assert size <= cap
        assert _dropped(telemetry, "spool_full") == groups * per_group - lines
        batch = await spool.next_batch(max_lines=per_group, max_wait=0)
        kept_groups = lines // per_group
        assert kept_groups < groups
        # The oldest groups went first: what is left is the newest, in order.
        assert batch.lines[0].startswith(f"m,g={groups - kept_groups} ")


async def test_drop_newest_refuses_new_data_and_counts_it(tmp_path: Path) -> None:
    telemetry = _telemetry()
    cap = 1024 * 1024
    async with SqliteSpool(
        tmp_path, telemetry, max_bytes=cap, overflow=OverflowPolicy.DROP_NEWEST
    ) as spool:
        await _fill(spool, 200, 1000)
        lines, size = spool.depth()
        assert size <= cap
        assert _dropped(telemetry, "spool_full") == 200 * 1000 - lines
        batch = await spool.next_batch(max_lines=1000, max_wait=0)
        assert batch.lines[0].startswith("m,g=0 ")  # the oldest data is kept


async def test_corrupt_spool_is_moved_aside_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / SPOOL_FILE).write_bytes(b"this is not a database" * 100)
    telemetry = _telemetry()
    async with SqliteSpool(tmp_path, telemetry) as spool:
        await spool.add("m v=1 1")
        assert spool.depth()[0] == 1
    moved = list(tmp_path.glob(f"{SPOOL_FILE}.corrupt-*"))
    assert len(moved) == 1
    assert moved[0].read_bytes().startswith(b"this is not a database")
    assert any("spool unreadable" in e.error for e in telemetry.recent_errors)


async def test_lines_with_newlines_in_string_fields_replay_intact(tmp_path: Path) -> None:
    lines = ['m,t=a payload="one\ntwo" 1', "m,t=a v=1 2", 'm payload="\n\u00fcber\n" 3']
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        await asyncio.gather(*(spool.add(line) for line in lines))
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        batch = await spool.next_batch(max_lines=10, max_wait=0)
        assert batch.replayed
        assert batch.lines == lines


async def test_a_spool_written_before_line_lengths_were_stored_is_replayed(
    tmp_path: Path,
) -> None:
    db = sqlite3.connect(tmp_path / SPOOL_FILE)
    db.execute(
        "CREATE TABLE groups (id INTEGER PRIMARY KEY, received_at REAL NOT NULL,"
        " lines INTEGER NOT NULL, bytes INTEGER NOT NULL, data BLOB NOT NULL)"
    )
    db.execute(
        "INSERT INTO groups (received_at, lines, bytes, data) VALUES (1.0, 2, 16, ?)",
        (b"m v=1 1\nm v=2 2",),
    )
    db.commit()
    db.close()
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        batch = await spool.next_batch(max_lines=10, max_wait=0)
        assert batch.lines == ["m v=1 1", "m v=2 2"]
        spool.add('m payload="a\nb" 3')
        await spool.flush()
    async with SqliteSpool(tmp_path, _telemetry()) as spool:
        assert (await spool.next_batch(max_lines=10, max_wait=0)).lines[-1] == 'm payload="a\nb" 3'
