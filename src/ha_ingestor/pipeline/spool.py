"""The durable spool: SQLite in WAL mode, group-committed, replayed oldest first.

Lines added by the sources wait in memory until the next group commit (see
:class:`CommitSchedule`); then one transaction stores them as a *group* row and their futures
resolve — only then does a line count as accepted (and only then is an MQTT QoS 1/2 message
acknowledged). The writer takes committed
groups oldest first, from memory while they fit and from disk after a restart or a long outage;
a group's row is deleted once InfluxDB has acknowledged it.

All SQLite work runs on one dedicated thread, so the event loop never waits on the disk.

Storage faults (disk full, read-only or vanished directory, deleted or damaged file, I/O errors)
are ridden out, not fatal: while one lasts the spool is ``full()`` — sources stop reading, and
nothing new is accepted, so nothing unacknowledged is lost — while groups already stored keep
draining to InfluxDB; deleting them, a released space reserve and WAL checkpoints give the disk
back. The spool retries by itself and resumes when the fault is gone. The fault handling lives
in the ``storage faults`` section below, apart from the commit scheduling.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import sqlite3
import time
from array import array
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ha_ingestor.config import OverflowPolicy
from ha_ingestor.pipeline.buffer import Batch, StorageStatus, wait_event
from ha_ingestor.pipeline.spool_storage import (
    SpaceReserve,
    SpoolFileMissingError,
    StorageFault,
    StorageState,
    classify,
    free_bytes,
)
from ha_ingestor.telemetry import Telemetry

SPOOL_FILE = "spool.sqlite3"
#: The subdirectory of the service's spool directory that ``ha-ingestor import`` spools in.
IMPORT_SPOOL = "import"
RESERVE_FILE = "spool.reserve"
_REBUILD_FILE = "spool.sqlite3.rebuild"

#: The WAL is checkpointed every this many pages and cut back to :data:`_WAL_LIMIT` bytes after
#: a checkpoint, so it never holds much more than the space reserve can take in.
_WAL_AUTOCHECKPOINT_PAGES = 256
_WAL_LIMIT = 1024 * 1024
#: Disk space the spool leaves free for itself: checkpointing the WAL into the file and deleting
#: what was written must never find the disk full.
_HEADROOM = 2 * _WAL_LIMIT
#: On a full disk, waiting lines are stored in parts of at least this size as space returns.
_MIN_PART = 64 * 1024
#: A fault that comes back within this many seconds of its end continues it (not logged again).
_FLAP_WINDOW = 30.0
#: Seconds between attempts while the storage fails: from the first to the last.
_RETRY_FIRST, _RETRY_MAX = 0.25, 2.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    lines INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    data BLOB NOT NULL,
    lengths BLOB
);
CREATE TABLE IF NOT EXISTS checkpoints (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SpoolError(Exception):
    """The spool cannot be opened or written (disk full, permissions)."""


#: A group's lines as stored: one newline-separated UTF-8 blob, and the lines' lengths when a
#: line itself holds a newline (see ``_pack``).
_Packed = tuple[bytes, bytes | None]


@dataclass(slots=True)
class _Group:
    group_id: int
    # In memory as the stored blob, not as line objects: compact, and freed in one piece.
    # None: only on disk (evicted from memory or from a previous run).
    packed: _Packed | None
    received_at: float
    count: int
    size: int


@dataclass(slots=True)
class _Pending:
    lines: list[str] = field(default_factory=list)
    size: int = 0
    first_at: float = 0.0
    future: asyncio.Future[None] | None = None


#: Longest a waiting writer sleeps without looking at the groups again.
_IDLE_LOOK = 1.0


class CommitSchedule:
    """When the group commit runs, adapting to the rate lines arrive at.

    A commit costs about the same for one line as for a hundred (a transaction, an fsync, a
    hop to the spool thread and back, a wake-up of the writer). So at a trickle the commit
    waits for ``eager_lines`` lines, or at most ``max_delay`` — at 100 lines/s, sixteen lines
    per commit instead of one, and one wake-up for the wait. In a burst — commits back to back,
    less than ``burst_gap`` apart — it then waits ``min_delay`` more, so that the lines of that
    time join the group. Not otherwise: lines that came in one hand-off (a coalesced read brings
    them so) gain no company in a few milliseconds, and the wait would be one more wake-up
    (0.3 ms of CPU on a small virtual machine).

    ``eager_lines`` stays below what a broker lets a subscriber hold unacknowledged (Mosquitto:
    20 by default), so a waiting commit never stalls a stream that the broker throttles.
    """

    def __init__(
        self,
        min_delay: float = 0.005,
        max_delay: float = 0.2,
        eager_lines: int = 16,
        burst_gap: float = 0.05,
    ) -> None:
        self.min_delay = min_delay
        self.max_delay = max(min_delay, max_delay)
        self.eager_lines = eager_lines
        self.burst_gap = burst_gap
        self._last_commit = -math.inf

    def committed(self) -> None:
        """A commit has ended (now)."""
        self._last_commit = time.monotonic()

    async def wait(self, pending: Callable[[], int], enough: asyncio.Event) -> None:
        """Return when the lines pending (``pending()``) should be committed; ``enough`` is set
        by the intake once ``eager_lines`` are pending."""
        if pending() < self.eager_lines:
            enough.clear()
            await wait_event(enough, self.max_delay)
            if not enough.is_set():
                return  # a trickle: the deadline
        if time.monotonic() - self._last_commit < self.burst_gap:
            await asyncio.sleep(self.min_delay)


def _resolver(future: asyncio.Future[None]) -> Callable[[asyncio.Future[None]], None]:
    def resolve(_: asyncio.Future[None]) -> None:
        if not future.done():
            future.set_result(None)

    return resolve


class SqliteSpool:
    """A :class:`~ha_ingestor.pipeline.buffer.Buffer` that survives crashes and restarts."""

    def __init__(
        self,
        directory: Path,
        telemetry: Telemetry,
        *,
        max_bytes: int = 1024**3,
        overflow: OverflowPolicy = OverflowPolicy.DROP_OLDEST,
        commit_interval: float = 0.005,
        max_commit_delay: float = 0.2,
        max_pending_lines: int = 100_000,
        max_memory_bytes: int = 16 * 1024 * 1024,
        synchronous: str = "FULL",
        min_free_bytes: int = 0,
        reserve_bytes: int = 1024 * 1024,
    ) -> None:
        self._directory = directory
        self._telemetry = telemetry
        self._max_bytes = max_bytes
        self._overflow = overflow
        self._schedule = CommitSchedule(commit_interval, max_commit_delay)
        self._enough = asyncio.Event()  # eager_lines are pending: commit without more waiting
        self._max_pending_lines = max_pending_lines
        self._max_memory_bytes = max_memory_bytes
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._pending = _Pending()
        self._groups: deque[_Group] = deque()  # committed, not yet handed to a writer
        self._in_flight: dict[int, _Group] = {}
        self._memory_bytes = 0
        self._lines = 0
        self._bytes = 0
        self._acked: list[int] = []
        self._checkpoints: dict[str, str] = {}
        self._dirty_checkpoints: dict[str, str] = {}
        self._wake_committer = asyncio.Event()
        self._committed = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._committer: asyncio.Task[None] | None = None
        self._closed = False
        # storage faults
        self._path = directory / SPOOL_FILE
        self._inode: int | None = None
        self._min_free_bytes = min_free_bytes
        self._reserve = SpaceReserve(directory / RESERVE_FILE, reserve_bytes)
        self._reserve_wanted = True
        self._free_bytes: int | None = None  # on the spool's disk, as of the last commit
        self._freelist_bytes = 0  # pages inside the spool file free for reuse
        self._freeing = 0  # bytes of groups the next commit deletes
        self._disk_room = 1 << 62  # bytes the disk can take, as of the last commit
        self._page_size = 4096
        self._fault: StorageFault | None = None
        self._last_fault: StorageFault | None = None
        self._recovered_at = 0.0
        self._recovery_logged_for: StorageFault | None = None
        self._quiet_since: float | None = None  # a continued fault, not logged again (yet)
        self._retry_delay = _RETRY_FIRST
        self._part_lock = asyncio.Lock()  # a part stored while full vs. the shutdown's flush
        self._part_ids: list[int] = []  # groups stored as parts of the waiting lines

    # --- lifecycle ---------------------------------------------------------------------------------
    async def __aenter__(self) -> SqliteSpool:
        await self._run(self._open)
        self._committer = asyncio.create_task(self._commit_loop(), name="spool-committer")
        self._update_gauges()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        await self.flush()
        self._closed = True
        if self._committer is not None:
            self._committer.cancel()
            await asyncio.gather(self._committer, return_exceptions=True)
        await self._forget_parts()
        await self._run(self._close_db)
        self._executor.shutdown(wait=True)
        self._telemetry.log.info(
            "spool closed",
            stored_lines=self._lines,
            stored_groups=len(self._groups) + len(self._in_flight),
            in_flight_groups=len(self._in_flight),
            waiting_lines=len(self._pending.lines),  # never accepted: sent again by the broker
            storage=self._fault.state.value if self._fault else "ok",
        )

    def _open(self) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        path = self._directory / SPOOL_FILE
        try:
            self._db = self._connect(path)
        except sqlite3.DatabaseError as exc:
            # A corrupt spool must not become a crash loop: keep it for inspection, start anew.
            aside = path.with_name(f"{SPOOL_FILE}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            self._telemetry.error(
                "spool", "spool unreadable, moved aside", error=str(exc), moved_to=str(aside)
            )
            self._db = self._connect(path)
        db = self._db
        for group_id, received_at, count, size in db.execute(
            "SELECT id, received_at, lines, bytes FROM groups ORDER BY id"
        ):
            self._groups.append(_Group(group_id, None, received_at, count, size))
            self._lines += count
            self._bytes += size
        self._checkpoints = dict(db.execute("SELECT key, value FROM checkpoints").fetchall())
        self._opened(db)
        if self._groups:
            self._telemetry.log.info(
                "spool replay", groups=len(self._groups), lines=self._lines, bytes=self._bytes
            )

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            # Not OFF-by-default everywhere (Debian builds SQLite with secure delete on): zeroing
            # every freed page doubles the writes of a drain and makes deletes need free space.
            db.execute("PRAGMA secure_delete=FAST")
            db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(groups)")}
            if "lengths" not in columns:  # a spool written by an earlier version
                db.execute("ALTER TABLE groups ADD COLUMN lengths BLOB")
            result = db.execute("PRAGMA quick_check").fetchone()
            if result is None or result[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {result}")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _close_db(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):  # a failing disk: the WAL stays as it is
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- intake ------------------------------------------------------------------------------------
    def add(self, line: str) -> asyncio.Future[None]:
        pending = self._pending
        if pending.future is None:
            pending.first_at = time.time()
            pending.future = asyncio.get_running_loop().create_future()
            self._wake_committer.set()
        pending.lines.append(line)
        pending.size += len(line) + 1
        if len(pending.lines) == self._schedule.eager_lines:
            self._enough.set()
        if len(pending.lines) >= self._max_pending_lines or pending.size >= self._disk_room:
            self._room.clear()
        return pending.future

    async def wait_for_room(self) -> None:
        await self._room.wait()

    def full(self) -> bool:
        return not self._room.is_set()

    async def flush(self) -> None:
        """Commit everything added so far; during a storage fault, make one attempt only: what
        cannot be committed is not accepted (its futures stay pending, MQTT messages are not
        acknowledged and the broker sends them again)."""
        async with self._part_lock:
            while self._pending.lines or self._acked or self._dirty_checkpoints:
                try:
                    await self._commit_once()
                except SpoolError:
                    return

    # --- checkpoints -------------------------------------------------------------------------------
    def load(self, key: str) -> str | None:
        return self._checkpoints.get(key)

    async def save(self, key: str, value: str) -> None:
        """Stored with the next group commit (after the data it covers)."""
        self._checkpoints[key] = value
        self._dirty_checkpoints[key] = value
        self._wake_committer.set()

    # --- group commit ------------------------------------------------------------------------------
    async def _commit_loop(self) -> None:
        while True:
            await self._wake_committer.wait()
            self._wake_committer.clear()
            # Let the lines accumulate: one transaction per group, not per line.
            await self._schedule.wait(lambda: len(self._pending.lines), self._enough)
            try:
                await self._commit_once()
            except SpoolError:
                await self._ride_out_fault()
            self._schedule.committed()

    async def _commit_once(self) -> None:
        pending, self._pending = self._pending, _Pending()
        acked, self._acked = self._acked, []
        freeing, self._freeing = self._freeing, 0
        checkpoints, self._dirty_checkpoints = self._dirty_checkpoints, {}
        if self._fault is None:
            self._room.set()
        if pending.lines:
            pending = self._admit(pending)
        packed = _pack(pending.lines) if pending.lines else None
        try:
            self._check_headroom(pending.size, freeing)
            group_id = await self._run(
                self._write,
                packed,
                pending.first_at,
                len(pending.lines),
                pending.size,
                acked,
                checkpoints,
            )
        except BaseException as exc:
            # Nothing was stored: put it back so it is retried, and keep callers waiting.
            self._restore(pending, acked, checkpoints)
            self._freeing += freeing
            if not isinstance(exc, Exception):
                raise
            self._storage_failed(exc)
            raise SpoolError(str(exc)) from exc
        self._part_ids.clear()  # their future resolved with this commit
        if self._fault is not None:
            self._storage_recovered()
        if group_id is not None:
            group = _Group(group_id, packed, pending.first_at, len(pending.lines), pending.size)
            self._groups.append(group)
            self._lines += group.count
            self._bytes += group.size
            self._keep_in_memory(group)
        if pending.future is not None and not pending.future.done():
            pending.future.set_result(None)
        self._update_gauges()
        self._committed.set()

    def _restore(self, pending: _Pending, acked: list[int], checkpoints: dict[str, str]) -> None:
        if pending.lines:
            newer = self._pending
            pending.lines.extend(newer.lines)
            pending.size += newer.size
            if newer.future is not None and pending.future is not None:
                pending.future.add_done_callback(_resolver(newer.future))
            self._pending = pending
        self._acked.extend(acked)
        for key, value in checkpoints.items():
            self._dirty_checkpoints.setdefault(key, value)

    def _admit(self, pending: _Pending) -> _Pending:
        """Apply the overflow policy before storing ``pending``: at the byte cap, or earlier
        when the disk is down to its free-space margin."""
        limit, disk_low = self._capacity()
        if self._bytes + pending.size <= limit:
            return pending
        reason = "disk_low" if disk_low else "spool_full"
        if self._overflow == OverflowPolicy.DROP_NEWEST:
            self._telemetry.dropped(reason, len(pending.lines), intentional=True)
            self._telemetry.warn_throttled(
                reason,
                10.0,
                "disk low, dropping newest" if disk_low else "spool full, dropping newest",
                lines=len(pending.lines),
                policy="drop_newest",
                free_bytes=self._free_bytes,
            )
            future = pending.future
            if future is not None and not future.done():
                future.set_result(None)  # handled by policy: the sender must not retry forever
            return _Pending()
        # drop_oldest: evict whole groups not in flight until the new data fits.
        dropped_lines = 0
        dropped_ids: list[int] = []
        while self._groups and self._bytes + pending.size > limit:
            old = self._groups.popleft()
            dropped_ids.append(old.group_id)
            dropped_lines += old.count
            self._lines -= old.count
            self._bytes -= old.size
            self._freeing += old.size
            if old.packed is not None:
                self._memory_bytes -= old.size
        if dropped_ids:
            self._acked.extend(dropped_ids)
            self._telemetry.dropped(reason, dropped_lines, intentional=True)
            self._telemetry.warn_throttled(
                reason,
                10.0,
                "disk low, dropping oldest" if disk_low else "spool full, dropping oldest",
                lines=dropped_lines,
                policy="drop_oldest",
                free_bytes=self._free_bytes,
            )
        return pending

    def _capacity(self) -> tuple[int, bool]:
        """Bytes the spool may hold now, and whether the disk's margin (not the cap) sets it."""
        if not self._min_free_bytes or self._free_bytes is None:
            return self._max_bytes, False
        # The margin includes the headroom and reserve the spool keeps for itself anyway.
        margin = max(self._min_free_bytes, _HEADROOM + self._reserve.size)
        room = self._free_bytes + self._freelist_bytes + self._freeing - margin
        limit = self._bytes + max(0, room)
        if limit < self._max_bytes:
            return limit, True
        return self._max_bytes, False

    def _write(
        self,
        packed: _Packed | None,
        received_at: float,
        count: int,
        size: int,
        acked: list[int],
        checkpoints: dict[str, str],
    ) -> int | None:
        db = self._db
        assert db is not None
        self._check_file()
        group_id: int | None = None
        db.execute("BEGIN")
        try:
            if packed is not None:
                cursor = db.execute(
                    "INSERT INTO groups (received_at, lines, bytes, data, lengths) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (received_at, count, size, *packed),
                )
                group_id = cursor.lastrowid
            if acked:
                db.executemany("DELETE FROM groups WHERE id = ?", [(i,) for i in acked])
            if checkpoints:
                db.executemany(
                    "INSERT INTO checkpoints (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    list(checkpoints.items()),
                )
            db.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (it does so itself on a full disk).
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        self._measure_space(db)
        return group_id

    def _keep_in_memory(self, group: _Group) -> None:
        if self._memory_bytes + group.size > self._max_memory_bytes:
            group.packed = None  # read back from disk when its turn comes
        else:
            self._memory_bytes += group.size

    # --- drain -------------------------------------------------------------------------------------
    async def next_batch(self, max_lines: int, max_wait: float) -> Batch:
        while True:
            waiting = 0
            for group in self._groups:
                waiting += group.count
                if waiting >= max_lines:
                    break
            if self._groups:
                oldest = self._groups[0].received_at
                if waiting >= max_lines or time.time() - oldest >= max_wait:
                    with contextlib.suppress(SpoolError):  # a read failed: retried shortly
                        return await self._take(max_lines)
                    await asyncio.sleep(_RETRY_MAX)
                    continue
                timeout = max(0.0, oldest + max_wait - time.time())
            else:
                # A look once a second even when nothing is waiting: a group handed back or
                # rebuilt without a commit must not wait for the next commit to be seen.
                timeout = _IDLE_LOOK
            self._committed.clear()
            await wait_event(self._committed, timeout)

    async def _take(self, max_lines: int) -> Batch:
        taken: list[_Group] = []
        count = 0
        while self._groups:
            group = self._groups[0]
            if taken and count + group.count > max_lines:
                break
            self._groups.popleft()
            taken.append(group)
            count += group.count
            self._in_flight[group.group_id] = group
        missing = [g.group_id for g in taken if g.packed is None]
        if missing:
            try:
                loaded: dict[int, _Packed] = await self._run(self._read, missing)
            except (sqlite3.Error, OSError) as exc:
                await self.release(Batch([g.group_id for g in taken], [], 0.0))
                self._storage_failed(exc)
                raise SpoolError(str(exc)) from exc
            for group in taken:
                if group.packed is None:
                    group.packed = loaded.get(group.group_id, (b"", None))
                    self._memory_bytes += group.size
        lines: list[str] = []
        for group in taken:
            assert group.packed is not None
            lines += _unpack(*group.packed)
        return Batch(
            [g.group_id for g in taken], lines, taken[0].received_at, replayed=bool(missing)
        )

    def _read(self, ids: list[int]) -> dict[int, _Packed]:
        db = self._db
        assert db is not None
        return self._read_from(db, ids)

    @classmethod
    def _read_or_none(cls, db: sqlite3.Connection, group_id: int) -> _Packed | None:
        try:
            return cls._read_from(db, [group_id]).get(group_id)
        except sqlite3.Error:  # a damaged page: the group cannot be read back
            return None

    @staticmethod
    def _read_from(db: sqlite3.Connection, ids: list[int]) -> dict[int, _Packed]:
        placeholders = ",".join("?" * len(ids))
        rows = db.execute(
            f"SELECT id, data, lengths FROM groups WHERE id IN ({placeholders})",  # noqa: S608
            ids,
        )
        return {group_id: (bytes(data), lengths) for group_id, data, lengths in rows}

    async def ack(self, batch: Batch) -> None:
        for group_id in batch.group_ids:
            group = self._in_flight.pop(group_id, None)
            if group is None:
                continue
            self._lines -= group.count
            self._bytes -= group.size
            self._memory_bytes -= group.size
            self._freeing += group.size
            self._acked.append(group_id)
        self._wake_committer.set()
        self._update_gauges()

    async def release(self, batch: Batch) -> None:
        """Give an unwritten batch back (shutdown): it stays on disk for the next start."""
        for group_id in reversed(batch.group_ids):
            group = self._in_flight.pop(group_id, None)
            if group is not None:
                self._groups.appendleft(group)
        self._committed.set()  # another writer may be waiting for groups

    def depth(self) -> tuple[int, int]:
        pending = self._pending
        return self._lines + len(pending.lines), self._bytes + pending.size

    def _update_gauges(self) -> None:
        metrics = self._telemetry.metrics
        metrics.spool_durable.set(0 if self._fault is not None else 1)
        metrics.spool_lines.set(self._lines)
        metrics.spool_bytes.set(self._bytes)
        metrics.queue_depth.labels("spool_pending").set(len(self._pending.lines))

    # --- storage faults ----------------------------------------------------------------------------
    def storage(self) -> StorageStatus:
        fault = self._fault
        if fault is None:
            return StorageStatus(durable=True, state="ok", free_bytes=self._free_bytes)
        return StorageStatus(
            durable=False,
            state=fault.state.value,
            error=fault.error,
            since=fault.since,
            advice=fault.advice,
            free_bytes=self._free_bytes,
        )

    def _opened(self, db: sqlite3.Connection) -> None:
        """After (re)opening the file: what later commits compare against and measure by."""
        self._inode = os.stat(self._path).st_ino
        self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        if self._reserve_wanted and self._reserve.make():
            self._reserve_wanted = False
        self._measure_space(db)

    def _check_file(self) -> None:
        """Before a commit: writing on to a file that was deleted would store nothing that
        survives a restart; and a directory that became read-only (a disk remounted read-only
        after errors, changed permissions) would stop the next start, which must create files
        there, even while the open file still takes writes."""
        try:
            inode = os.stat(self._path).st_ino
        except FileNotFoundError:
            raise SpoolFileMissingError(errno.ENOENT, f"{self._path} was removed") from None
        if inode != self._inode:
            raise SpoolFileMissingError(errno.ENOENT, f"{self._path} was replaced")
        if not os.access(self._directory, os.W_OK):
            raise OSError(errno.EROFS, f"{self._directory} is not writable")

    def _measure_space(self, db: sqlite3.Connection) -> None:
        """Free space on the disk and inside the file (runs on the spool thread after commits);
        takes the space reserve again once there is plenty."""
        free = self._free_bytes = free_bytes(self._directory)
        self._freelist_bytes = int(db.execute("PRAGMA freelist_count").fetchone()[0]) * (
            self._page_size
        )
        if self._reserve_wanted and free is not None and free > self._reserve.size + _HEADROOM:
            self._reserve_wanted = not self._reserve.make()
            if not self._reserve_wanted:
                self._free_bytes = free_bytes(self._directory)
        # Sources stop reading before the disk is full, not after the next commit found out.
        self._disk_room = max(_MIN_PART, self._room_bytes())

    def _storage_failed(self, exc: BaseException) -> None:
        """Count a failed spool operation; stop intake and log when the state changes. A
        disk that fills again soon after it had room (the drain and the intake taking turns)
        continues the fault it came out of: logged once, not at every turn."""
        state = classify(exc, self._directory)
        telemetry = self._telemetry
        telemetry.metrics.spool_errors.labels(state.value).inc()
        self._room.clear()  # sources stop reading: the broker holds what is not acknowledged
        previous = self._fault
        if previous is not None and previous.state == state:
            return
        now = telemetry.clock()
        last = self._last_fault
        if (
            previous is None
            and last is not None
            and last.state == state
            and now - self._recovered_at < _FLAP_WINDOW
        ):
            self._fault = last  # same fault, same start
            self._quiet_since = now
            self._update_gauges()
            return
        self._fault = fault = self._last_fault = StorageFault(state, str(exc), now)
        self._log_fault(fault)

    def _log_fault(self, fault: StorageFault) -> None:
        self._telemetry.error(
            "spool",
            "spool cannot store new data",
            reason=fault.state.value,
            error=fault.error,
            directory=str(self._directory),
            waiting_lines=len(self._pending.lines),
            action=fault.advice,
        )
        self._update_gauges()

    def _storage_recovered(self) -> None:
        fault = self._fault
        assert fault is not None
        self._fault = None
        self._quiet_since = None
        self._retry_delay = _RETRY_FIRST
        now = self._recovered_at = self._telemetry.clock()
        if len(self._pending.lines) < self._max_pending_lines:
            self._room.set()
        if self._recovery_logged_for is not fault:
            self._recovery_logged_for = fault
            self._telemetry.log.warning(
                "spool storing again",
                reason=fault.state.value,
                lasted_seconds=round(now - fault.since, 1),
            )

    async def _ride_out_fault(self) -> None:
        """Between failed commits: recover what can be recovered, then wait to retry. On a
        full disk new data is tried again only once there is room for it and for the space
        reserve: the space that deletes free must not be eaten up by the next insert."""
        while (fault := self._fault) is not None and not self._closed:
            quiet = self._quiet_since
            if quiet is not None and self._telemetry.clock() - quiet > _FLAP_WINDOW:
                self._quiet_since = None  # it lasts after all: say so, and later its end
                self._recovery_logged_for = None
                self._log_fault(fault)
            if fault.state in (StorageState.MISSING, StorageState.CORRUPT):
                await self._rebuild()
            else:
                await self._reclaim(fault.state)
            if fault.state != StorageState.DISK_FULL:
                await asyncio.sleep(self._retry_delay)
                self._retry_delay = min(_RETRY_MAX, self._retry_delay * 2)
                break
            while await self._store_part():  # the backlog goes in as space comes back
                pass
            if self._room_for_pending():
                break
            await asyncio.sleep(_RETRY_FIRST)
        self._wake_committer.set()

    async def _store_part(self) -> bool:
        """Disk full, with some room back: store the oldest waiting lines that fit as a group
        of their own. Their future resolves with the rest (one future covers all the lines
        added with it); False when nothing could be stored."""
        async with self._part_lock:
            pending = self._pending
            budget = self._room_bytes() // 2
            if not pending.lines or budget < _MIN_PART:
                return False
            count, size = 0, 0
            for text in pending.lines:
                if size + len(text) + 1 > budget and count:
                    break
                count += 1
                size += len(text) + 1
            if count == len(pending.lines):
                return False  # all of it fits: the ordinary commit takes it
            lines = pending.lines[:count]
            packed = _pack(lines)
            try:
                group_id = await self._run(
                    self._write, packed, pending.first_at, count, size, [], {}
                )
            except (sqlite3.Error, OSError) as exc:
                self._telemetry.metrics.spool_errors.labels(classify(exc, self._directory)).inc()
                return False
            del pending.lines[:count]
            pending.size -= size
            assert group_id is not None
            self._part_ids.append(group_id)
            group = _Group(group_id, packed, pending.first_at, count, size)
            self._groups.append(group)
            self._lines += count
            self._bytes += size
            self._keep_in_memory(group)
            self._update_gauges()
            self._committed.set()
            return True

    def _room_for_pending(self) -> bool:
        """Whether to try storing new data again after the disk was full."""
        return self._room_for(self._pending.size)

    async def _forget_parts(self) -> None:
        """At close, with waiting lines that could not all be stored: delete the parts stored
        of them. They were never accepted (their future never resolved, no MQTT message among
        them was acknowledged): the broker sends them again, and kept they would be stored
        twice."""
        if not self._pending.lines or not self._part_ids:
            return
        ids, self._part_ids = self._part_ids, []
        try:
            await self._run(self._write, None, 0.0, 0, 0, ids, {})
        except (sqlite3.Error, OSError) as exc:
            self._telemetry.metrics.spool_errors.labels(classify(exc, self._directory)).inc()

    def _room_bytes(self, freeing: int = 0) -> int:
        """Bytes the spool may still fill, keeping its headroom and the space reserve."""
        free = self._free_bytes
        if free is None:
            return 1 << 62
        reserve = self._reserve.size if self._reserve_wanted else 0
        return free + self._freelist_bytes + self._freeing + freeing - _HEADROOM - reserve

    def _room_for(self, size: int, freeing: int = 0) -> bool:
        """Whether ``size`` more bytes leave the disk the headroom the spool needs to drain,
        and the space reserve; after a full disk, with more to spare (no flapping)."""
        room = self._room_bytes(freeing)
        fault = self._fault
        if fault is not None and fault.state == StorageState.DISK_FULL:
            return room >= 2 * size  # as _store_part: half the room, at most
        return room >= size

    def _check_headroom(self, size: int, freeing: int) -> None:
        """Refuse to store ``size`` more bytes (while deleting ``freeing``) where it would leave
        no room to drain: as if the disk were full, which it nearly is."""
        if not self._room_for(size, freeing):
            raise OSError(errno.ENOSPC, f"less than {_HEADROOM} bytes would be left free")

    async def _reclaim(self, state: StorageState) -> None:
        """Make room while new data cannot be stored: delete what InfluxDB has stored, on its
        own, so the drain goes on (with the reserve given back and the WAL checkpointed first
        when the disk is full)."""
        acked, self._acked = self._acked, []
        freeing, self._freeing = self._freeing, 0
        try:
            await self._run(self._delete_written, acked, state == StorageState.DISK_FULL)
        except (sqlite3.Error, OSError) as exc:
            self._acked[:0] = acked
            self._freeing += freeing
            self._telemetry.metrics.spool_errors.labels(classify(exc, self._directory)).inc()
        self._update_gauges()

    def _delete_written(self, acked: list[int], disk_full: bool) -> None:
        db = self._db
        assert db is not None
        if disk_full:
            if self._reserve.release():
                self._reserve_wanted = True
            # Copies the WAL into the file (which may need to grow: the reserve's space) and
            # cuts the WAL to nothing; the deletes then fit in what that gave back.
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if acked:
            self._write(None, 0.0, 0, 0, acked, {})
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._measure_space(db)

    async def _rebuild(self) -> None:
        """The file was deleted or is damaged: write what the spool still holds (groups in
        memory, and those the old file still yields) into a new file at the same place."""
        held = [*self._in_flight.values(), *self._groups]
        snapshot = [(g.group_id, g.packed, g.received_at, g.count, g.size) for g in held]
        try:
            lost: list[int] = await self._run(self._rebuild_file, snapshot, dict(self._checkpoints))
        except (sqlite3.Error, OSError) as exc:
            self._telemetry.metrics.spool_errors.labels(classify(exc, self._directory)).inc()
            return
        if lost:
            gone = set(lost)
            dropped = [g for g in self._groups if g.group_id in gone]
            self._groups = deque(g for g in self._groups if g.group_id not in gone)
            for group in dropped:
                self._lines -= group.count
                self._bytes -= group.size
            count = sum(g.count for g in dropped)
            self._telemetry.dropped("spool_lost", count, intentional=False)
            self._telemetry.error(
                "spool", "spool data lost with the damaged file", lines=count, groups=len(gone)
            )
        self._telemetry.log.info("spool file rebuilt", groups=len(snapshot) - len(lost))

    def _rebuild_file(
        self, groups: list[tuple[int, _Packed | None, float, int, int]], checkpoints: dict[str, str]
    ) -> list[int]:
        old = self._db
        assert old is not None
        self._directory.mkdir(parents=True, exist_ok=True)
        rebuild = self._directory / _REBUILD_FILE
        for suffix in ("", "-wal", "-shm"):
            Path(str(rebuild) + suffix).unlink(missing_ok=True)
        lost: list[int] = []
        new = self._connect(rebuild)
        try:
            new.execute("BEGIN")
            for group_id, held, received_at, count, size in groups:
                packed = held if held is not None else self._read_or_none(old, group_id)
                if packed is None:
                    lost.append(group_id)
                    continue
                new.execute(
                    "INSERT INTO groups (id, received_at, lines, bytes, data, lengths) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (group_id, received_at, count, size, *packed),
                )
            new.executemany(
                "INSERT INTO checkpoints (key, value) VALUES (?, ?)", list(checkpoints.items())
            )
            new.execute("COMMIT")
            new.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except BaseException:
            new.close()
            rebuild.unlink(missing_ok=True)
            raise
        new.close()
        if self._path.exists():  # damaged, not deleted: keep it for inspection
            self._path.rename(self._path.with_name(f"{SPOOL_FILE}.corrupt-{int(time.time())}"))
        with contextlib.suppress(sqlite3.Error):
            old.close()  # the old file's WAL goes with it
        self._db = None
        rebuild.replace(self._path)
        self._db = db = self._connect(self._path)
        self._opened(db)
        return lost


def _pack(lines: list[str]) -> _Packed:
    """A group's lines as one blob, newline-separated. A string field may hold a newline of its
    own; then the lines' lengths (in characters) are stored too, to split them back exactly."""
    text = "\n".join(lines)
    if text.count("\n") == len(lines) - 1:
        return text.encode(), None
    return text.encode(), array("I", map(len, lines)).tobytes()


def _unpack(data: bytes, lengths: bytes | None) -> list[str]:
    if not data:
        return []
    text = data.decode()
    if lengths is None:
        return text.split("\n")
    lines, start = [], 0
    for length in array("I", lengths):
        lines.append(text[start : start + length])
        start += length + 1
    return lines


def read_checkpoint(directory: Path, key: str) -> str | None:
    """A checkpoint of a spool that another process may have open, read without taking part in
    it: read-only, no replay, no recovery. None when there is no spool or no such checkpoint."""
    path = directory / SPOOL_FILE
    if not path.exists():
        return None
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        ) as db:
            if not db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'checkpoints'"
            ).fetchone():
                return None  # a spool being created right now
            row = db.execute("SELECT value FROM checkpoints WHERE key = ?", (key,)).fetchone()
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot read {path}: {exc}") from exc
    return None if row is None else str(row[0])
