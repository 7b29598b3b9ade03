"""The durable spool: SQLite in WAL mode, group-committed, replayed oldest first.

Lines added by the sources wait in memory until the next group commit (see
:class:`CommitSchedule`); then one transaction stores them as a *group* row and their futures
resolve — only then does a line count as accepted (and only then is an MQTT QoS 1/2 message
acknowledged). The writer takes committed
groups oldest first, from memory while they fit and from disk after a restart or a long outage;
a group's row is deleted once InfluxDB has acknowledged it.

All SQLite work runs on one dedicated thread, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from ha_ingestor.pipeline.buffer import Batch
from ha_ingestor.telemetry import Telemetry

SPOOL_FILE = "spool.sqlite3"

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


class CommitSchedule:
    """When the group commit runs, adapting to the rate lines arrive at.

    A commit costs about the same for one line as for a hundred (a transaction, an fsync, a
    hop to the spool thread and back, a wake-up of the writer). So the commit waits at least
    ``min_delay`` after the first line — in a burst, the lines of that time and of the commit
    before make one group — and at a trickle it waits for ``eager_lines`` lines, or at most
    ``max_delay``: at 100 lines/s, sixteen lines per commit instead of one.

    ``eager_lines`` stays below what a broker lets a subscriber hold unacknowledged (Mosquitto:
    20 by default), so a waiting commit never stalls a stream that the broker throttles.
    """

    def __init__(
        self, min_delay: float = 0.005, max_delay: float = 0.2, eager_lines: int = 16
    ) -> None:
        self.min_delay = min_delay
        self.max_delay = max(min_delay, max_delay)
        self.eager_lines = eager_lines

    async def wait(self, pending: Callable[[], int], enough: asyncio.Event) -> None:
        """Return when the lines pending (``pending()``) should be committed; ``enough`` is set
        by the intake once ``eager_lines`` are pending."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay
        await asyncio.sleep(self.min_delay)
        remaining = deadline - loop.time()
        if pending() >= self.eager_lines or remaining <= 0:
            return
        enough.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), remaining)


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
        await self._run(self._close_db)
        self._executor.shutdown(wait=True)

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
        if self._groups:
            self._telemetry.log.info(
                "spool replay", groups=len(self._groups), lines=self._lines, bytes=self._bytes
            )

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
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
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
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
        if len(pending.lines) >= self._max_pending_lines:
            self._room.clear()
        return pending.future

    async def wait_for_room(self) -> None:
        await self._room.wait()

    def full(self) -> bool:
        return not self._room.is_set()

    async def flush(self) -> None:
        """Commit everything added so far."""
        while self._pending.lines or self._acked or self._dirty_checkpoints:
            await self._commit_once()

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
            except Exception as exc:
                self._telemetry.error("spool", "spool commit failed", error=str(exc))
                await asyncio.sleep(1.0)
                self._wake_committer.set()

    async def _commit_once(self) -> None:
        pending, self._pending = self._pending, _Pending()
        acked, self._acked = self._acked, []
        checkpoints, self._dirty_checkpoints = self._dirty_checkpoints, {}
        self._room.set()
        if pending.lines:
            pending = self._admit(pending)
        packed = _pack(pending.lines) if pending.lines else None
        try:
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
            if not isinstance(exc, Exception):
                raise
            raise SpoolError(str(exc)) from exc
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
        """Apply the overflow policy before storing ``pending``."""
        if self._bytes + pending.size <= self._max_bytes:
            return pending
        if self._overflow == OverflowPolicy.DROP_NEWEST:
            self._telemetry.dropped("spool_full", len(pending.lines), intentional=True)
            self._telemetry.warn_throttled(
                "spool_full",
                10.0,
                "spool full, dropping newest",
                lines=len(pending.lines),
                policy="drop_newest",
            )
            future = pending.future
            if future is not None and not future.done():
                future.set_result(None)  # handled by policy: the sender must not retry forever
            return _Pending()
        # drop_oldest: evict whole groups not in flight until the new data fits.
        dropped_lines = 0
        dropped_ids: list[int] = []
        while self._groups and self._bytes + pending.size > self._max_bytes:
            old = self._groups.popleft()
            dropped_ids.append(old.group_id)
            dropped_lines += old.count
            self._lines -= old.count
            self._bytes -= old.size
            if old.packed is not None:
                self._memory_bytes -= old.size
        if dropped_ids:
            self._acked.extend(dropped_ids)
            self._telemetry.dropped("spool_full", dropped_lines, intentional=True)
            self._telemetry.warn_throttled(
                "spool_full",
                10.0,
                "spool full, dropping oldest",
                lines=dropped_lines,
                policy="drop_oldest",
            )
        return pending

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
            db.execute("ROLLBACK")
            raise
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
                    return await self._take(max_lines)
                timeout: float | None = max(0.0, oldest + max_wait - time.time())
            else:
                timeout = None
            self._committed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._committed.wait(), timeout)

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
            loaded: dict[int, _Packed] = await self._run(self._read, missing)
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
            self._acked.append(group_id)
        self._wake_committer.set()
        self._update_gauges()

    async def release(self, batch: Batch) -> None:
        """Give an unwritten batch back (shutdown): it stays on disk for the next start."""
        for group_id in reversed(batch.group_ids):
            group = self._in_flight.pop(group_id, None)
            if group is not None:
                self._groups.appendleft(group)

    def depth(self) -> tuple[int, int]:
        pending = self._pending
        return self._lines + len(pending.lines), self._bytes + pending.size

    def _update_gauges(self) -> None:
        metrics = self._telemetry.metrics
        metrics.spool_lines.set(self._lines)
        metrics.spool_bytes.set(self._bytes)
        metrics.queue_depth.labels("spool_pending").set(len(self._pending.lines))


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
