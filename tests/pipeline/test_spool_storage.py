"""The spool on a real small disk (tmpfs): full, read-only, its file deleted — and back."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ha_ingestor.config import OverflowPolicy
from ha_ingestor.pipeline.buffer import Batch
from ha_ingestor.pipeline.spool import SPOOL_FILE, SqliteSpool
from ha_ingestor.pipeline.spool_storage import StorageState, classify
from ha_ingestor.telemetry import Telemetry
from tests.support.small_disk import fill, read_only, small_disk
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

PAD = "x" * 280  # ~330 bytes a line, like an MQTT message point


def line(i: int) -> str:
    return f'mqtt_message,topic=t/{i % 50} payload="{i}",pad="{PAD}" {i}'


def number(text: str) -> int:
    return int(text.rsplit(" ", 1)[1])


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_disk(tmp_path / "disk", "6m") as path:
        yield path


def telemetry() -> Telemetry:
    return Telemetry(CollectorRegistry())


def sample(t: Telemetry, name: str, **labels: str) -> float:
    return t.metrics.registry.get_sample_value(name, labels) or 0.0


class Producer:
    """Adds numbered lines as a source does: it stops while ``full()`` (MQTT pauses reading)."""

    def __init__(self, spool: SqliteSpool, count: int) -> None:
        self.futures: list[asyncio.Future[None]] = []
        self.task = asyncio.create_task(self._run(spool, count))

    async def _run(self, spool: SqliteSpool, count: int) -> None:
        for i in range(count):
            if spool.full():
                await spool.wait_for_room()
            self.futures.append(spool.add(line(i)))
            if i % 200 == 0:
                await asyncio.sleep(0.002)

    @property
    def accepted(self) -> int:
        return sum(1 for f in self.futures if f.done())


class Drain:
    """The writer's side: takes batches and acknowledges them while ``writing`` is set."""

    def __init__(self, spool: SqliteSpool) -> None:
        self.lines: list[str] = []
        self.writing = asyncio.Event()
        self.task = asyncio.create_task(self._run(spool))

    async def _run(self, spool: SqliteSpool) -> None:
        while True:
            await self.writing.wait()
            batch = await spool.next_batch(2000, 0.05)
            self.lines += batch.lines
            await spool.ack(batch)

    def stop(self) -> None:
        self.task.cancel()


async def test_a_full_disk_pauses_intake_keeps_draining_and_resumes_by_itself(disk: Path) -> None:
    t = telemetry()
    total = 30_000  # ~10 MB of lines on a 6 MB disk
    async with SqliteSpool(disk / "spool", t) as spool:
        producer = Producer(spool, total)
        drain = Drain(spool)
        await wait_for(lambda: spool.storage().state == "disk_full", timeout=30)
        # Nothing more is accepted, and the spool says so.
        assert spool.full()
        status = spool.storage()
        assert not status.durable
        assert status.advice is not None
        assert "free space" in status.advice
        await asyncio.sleep(1.0)  # what still fits under the headroom goes in, then no more
        accepted = producer.accepted
        assert 0 < accepted < total
        await asyncio.sleep(1.5)
        assert producer.accepted == accepted
        assert sample(t, "ha_ingestor_spool_durable") == 0
        assert sample(t, "ha_ingestor_spool_errors_total", reason="disk_full") >= 1
        # InfluxDB is back: what is spooled drains, its space comes back, intake resumes.
        drain.writing.set()
        await asyncio.wait_for(producer.task, 60)
        await spool.flush()
        await wait_for(lambda: len(drain.lines) >= total, timeout=60)
        drain.stop()
        assert sorted(map(number, drain.lines)) == list(range(total))
        assert all(f.done() for f in producer.futures)
        assert spool.storage().state == "ok"
        assert sample(t, "ha_ingestor_spool_durable") == 1
    assert (
        sample(t, "ha_ingestor_events_dropped_total", reason="spool_full", intentional="true") == 0
    )


async def test_storage_faults_are_logged_once_per_state_change(disk: Path) -> None:
    t = telemetry()
    logged: list[str] = []
    error = t.error

    def spy(component: str, message: str, **data: object) -> None:
        logged.append(message)
        error(component, message, **data)

    t.error = spy  # type: ignore[method-assign]
    async with SqliteSpool(disk / "spool", t) as spool:
        producer = Producer(spool, 30_000)
        await wait_for(lambda: spool.storage().state == "disk_full", timeout=30)
        await asyncio.sleep(2.5)  # several failed attempts
        assert logged.count("spool cannot store new data") == 1
        assert sample(t, "ha_ingestor_spool_errors_total", reason="disk_full") >= 1
        producer.task.cancel()


async def test_read_only_directory_then_writable_again_loses_nothing_accepted(
    disk: Path,
) -> None:
    t = telemetry()
    directory = disk / "spool"
    async with SqliteSpool(directory, t) as spool:
        await asyncio.gather(*(spool.add(line(i)) for i in range(1000)))
        with read_only(directory):
            late = [spool.add(line(i)) for i in range(1000, 1500)]
            await wait_for(lambda: spool.storage().state == "read_only", timeout=10)
            assert spool.full()
            await asyncio.sleep(0.5)
            assert not any(f.done() for f in late)  # not accepted: not acknowledged
            assert sample(t, "ha_ingestor_spool_errors_total", reason="read_only") >= 1
            # What is spooled can still be read and written to InfluxDB.
            batch = await spool.next_batch(5000, 0)
            assert sorted(map(number, batch.lines)) == list(range(1000))
            await spool.release(batch)
        await asyncio.wait_for(asyncio.gather(*late), 10)
        assert spool.storage().state == "ok"
        assert not spool.full()
    async with SqliteSpool(directory, telemetry()) as spool:
        batch = await spool.next_batch(5000, 0)
        assert sorted(map(number, batch.lines)) == list(range(1500))


async def test_a_deleted_spool_file_is_rebuilt_from_what_the_service_holds(disk: Path) -> None:
    t = telemetry()
    directory = disk / "spool"
    async with SqliteSpool(directory, t, max_memory_bytes=100_000) as spool:
        await asyncio.gather(*(spool.add(line(i)) for i in range(2000)))  # most only on disk
        (directory / SPOOL_FILE).unlink()
        late = [spool.add(line(i)) for i in range(2000, 2500)]
        await wait_for(lambda: all(f.done() for f in late), timeout=20)
        assert spool.storage().state == "ok"
        assert sample(t, "ha_ingestor_spool_errors_total", reason="missing") >= 1
        assert (directory / SPOOL_FILE).exists()
    async with SqliteSpool(directory, telemetry()) as spool:
        batch = await spool.next_batch(5000, 0)
        assert sorted(map(number, batch.lines)) == list(range(2500))


async def test_a_removed_spool_directory_is_made_again(disk: Path) -> None:
    directory = disk / "spool"
    async with SqliteSpool(directory, telemetry()) as spool:
        await asyncio.gather(*(spool.add(line(i)) for i in range(300)))
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
        await asyncio.wait_for(asyncio.gather(*(spool.add(line(i)) for i in range(300, 400))), 20)
    async with SqliteSpool(directory, telemetry()) as spool:
        batch = await spool.next_batch(5000, 0)
        assert sorted(map(number, batch.lines)) == list(range(400))


async def test_close_returns_promptly_while_the_disk_is_full(disk: Path) -> None:
    directory = disk / "spool"
    spool = SqliteSpool(directory, telemetry())
    await spool.__aenter__()
    producer = Producer(spool, 30_000)
    await wait_for(lambda: spool.storage().state == "disk_full", timeout=30)
    producer.task.cancel()
    # More than the disk can take arrives before the source pauses.
    producer.futures += [spool.add(line(i)) for i in range(100_000, 120_000)]
    began = time.monotonic()
    await asyncio.wait_for(spool.close(), 10)
    assert time.monotonic() - began < 5
    accepted = producer.accepted
    assert accepted < len(producer.futures)  # the rest never accepted, so never acknowledged
    async with SqliteSpool(directory, telemetry()) as spool:
        assert spool.depth()[0] == accepted


async def test_the_free_space_margin_applies_the_overflow_policy_before_the_disk_is_full(
    disk: Path,
) -> None:
    t = telemetry()
    async with SqliteSpool(
        disk / "spool", t, min_free_bytes=2 * 1024 * 1024, overflow=OverflowPolicy.DROP_OLDEST
    ) as spool:
        producer = Producer(spool, 20_000)
        await asyncio.wait_for(producer.task, 60)
        await spool.flush()
        assert spool.storage().state == "ok"  # never full: the margin kept it free
        assert all(f.done() for f in producer.futures)
        dropped = sample(
            t, "ha_ingestor_events_dropped_total", reason="disk_low", intentional="true"
        )
        assert dropped > 0
        lines, _ = spool.depth()
        assert lines == 20_000 - dropped
        status = spool.storage()
        assert status.free_bytes is not None
        assert status.free_bytes > 1024 * 1024
        batch = await spool.next_batch(30_000, 0)
        # drop_oldest: what is kept is the newest.
        assert sorted(map(number, batch.lines)) == list(range(int(dropped), 20_000))


async def test_another_program_filling_the_disk_is_a_fault_ridden_out(disk: Path) -> None:
    directory = disk / "spool"
    async with SqliteSpool(directory, telemetry()) as spool:
        await asyncio.gather(*(spool.add(line(i)) for i in range(100)))
        ballast = fill(disk)
        late = [spool.add(line(i)) for i in range(100, 3100)]
        await wait_for(lambda: spool.storage().state == "disk_full", timeout=10)
        ballast.unlink()  # the user frees space
        await asyncio.wait_for(asyncio.gather(*late), 20)
        assert spool.storage().state == "ok"
        batch = await spool.next_batch(5000, 0)
        assert sorted(map(number, batch.lines)) == list(range(3100))
        await spool.ack(batch)
        assert isinstance(batch, Batch)


@pytest.mark.parametrize(
    ("exc", "state"),
    [
        (sqlite3.OperationalError("database or disk is full"), StorageState.DISK_FULL),
        (sqlite3.OperationalError("attempt to write a readonly database"), StorageState.READ_ONLY),
        (sqlite3.DatabaseError("database disk image is malformed"), StorageState.CORRUPT),
        (sqlite3.DatabaseError("file is not a database"), StorageState.CORRUPT),
        (sqlite3.OperationalError("disk I/O error"), StorageState.IO_ERROR),
        (OSError(errno.ENOSPC, "No space left on device"), StorageState.DISK_FULL),
        (OSError(errno.EROFS, "Read-only file system"), StorageState.READ_ONLY),
        (FileNotFoundError(errno.ENOENT, "gone"), StorageState.MISSING),
        (OSError(errno.EIO, "Input/output error"), StorageState.IO_ERROR),
    ],
)
def test_errors_are_classified_by_what_they_mean(exc: BaseException, state: StorageState) -> None:
    assert classify(exc) == state
