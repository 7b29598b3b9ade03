"""The hand-over between the pipeline and the InfluxDB writer.

Sources encode points to line protocol and ``add`` them; lines are collected into *groups* that
are committed together (group commit). A group's future resolves when the group is accepted —
durable on disk for the spool, in memory for :class:`MemoryBuffer`. The writer takes ``Batch``es
of whole groups, oldest first, and ``ack``s them once InfluxDB has stored them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class Batch:
    """Groups handed to one write request. ``lines`` have no trailing newline."""

    group_ids: list[int]
    lines: list[str]
    oldest_received_at: float  # wall clock (time.time()) of the oldest line's receipt
    replayed: bool = False  # True when read back from disk after a restart


@dataclass(frozen=True, slots=True)
class StorageStatus:
    """Whether what the buffer accepts survives a crash, and if not now, why (``/status``)."""

    durable: bool  # accepted lines are on disk
    state: str  # "ok", "memory" (no spool), or the storage fault: "disk_full", "read_only", ...
    error: str | None = None
    since: float | None = None  # start of the fault
    advice: str | None = None  # what the user can do about it
    free_bytes: int | None = None  # free space on the spool's disk

    @property
    def faulted(self) -> bool:
        return self.state not in ("ok", "memory")


MEMORY_ONLY = StorageStatus(durable=False, state="memory")


async def wait_event(event: asyncio.Event, seconds: float | None) -> None:
    """Wait until ``event`` is set or ``seconds`` pass (None: no limit). Not ``asyncio.wait_for``: on
    Python 3.11 it can swallow a cancellation that arrives as the event is set, and a loop
    around it then never stops (a writer at shutdown did exactly that)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


class Buffer(Protocol):
    """What sources feed and the writer drains. Implementations: MemoryBuffer, SqliteSpool."""

    def add(self, line: str) -> asyncio.Future[None]:
        """Queue one encoded line; the future resolves once it is accepted (durable)."""
        ...

    async def wait_for_room(self) -> None:
        """Return when the buffer can take more; sources await it to apply back-pressure."""
        ...

    def full(self) -> bool:
        """True while sources should stop reading (see ``wait_for_room``)."""
        ...

    async def next_batch(self, max_lines: int, max_wait: float) -> Batch:
        """Wait for ``max_lines`` lines or until the oldest waiting line is ``max_wait`` s old."""
        ...

    async def ack(self, batch: Batch) -> None:
        """The batch is in InfluxDB (or dead-lettered): forget it."""
        ...

    async def release(self, batch: Batch) -> None:
        """The batch was not written (shutdown): hand it out again first next time."""
        ...

    def depth(self) -> tuple[int, int]:
        """Lines and bytes accepted but not yet acknowledged by InfluxDB."""
        ...

    async def flush(self) -> None:
        """Commit every line added so far (shutdown). Returns also when the storage cannot
        commit: what is not committed then is not accepted (its futures stay pending)."""
        ...

    def storage(self) -> StorageStatus:
        """Durability now; while the spool's storage fails, ``full()`` is True as well."""
        ...


@dataclass(slots=True)
class _Group:
    group_id: int
    lines: list[str]
    received_at: float
    size: int


@dataclass(slots=True)
class _Pending:
    lines: list[str] = field(default_factory=list)
    size: int = 0
    first_at: float = 0.0


class MemoryBuffer:
    """A bounded in-memory buffer with the same contract as the spool, minus durability.

    Used when the spool is switched off, and as the baseline the durability cost is measured
    against. ``add`` futures resolve at the next group boundary, so back-pressure and batching
    behave exactly as with the spool.
    """

    def __init__(self, max_lines: int = 200_000, group_lines: int = 1000) -> None:
        self._max_lines = max_lines
        self._group_lines = group_lines
        self._pending = _Pending()
        self._pending_future: asyncio.Future[None] | None = None
        self._groups: dict[int, _Group] = {}
        self._ready: list[int] = []  # group ids not handed to a writer, oldest first
        self._ready_lines = 0  # lines in those groups
        self._wanted_lines = 1  # the batch size the writers ask for
        self._next_id = 1
        self._lines = 0
        self._bytes = 0
        self._changed = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def add(self, line: str) -> asyncio.Future[None]:
        pending = self._pending
        if not pending.lines:
            pending.first_at = time.time()
            self._pending_future = asyncio.get_running_loop().create_future()
        pending.lines.append(line)
        pending.size += len(line) + 1
        self._lines += 1
        self._bytes += len(line) + 1
        future = self._pending_future
        assert future is not None
        if len(pending.lines) >= self._group_lines:
            self._seal()
        elif len(pending.lines) == 1:
            # Seal on the next loop iteration: everything added in this burst becomes one group.
            asyncio.get_running_loop().call_soon(self._seal)
        if self._lines >= self._max_lines:
            self._room.clear()
        return future

    def _seal(self) -> None:
        pending = self._pending
        if not pending.lines:
            return
        group = _Group(self._next_id, pending.lines, pending.first_at, pending.size)
        self._next_id += 1
        self._groups[group.group_id] = group
        self._ready.append(group.group_id)
        self._ready_lines += len(group.lines)
        self._pending = _Pending()
        future, self._pending_future = self._pending_future, None
        if future is not None and not future.done():
            future.set_result(None)
        # Wake the writers only when it changes what they wait for: a first group (a deadline
        # to wait for) or a full batch; not on every group in between.
        if len(self._ready) == 1 or self._ready_lines >= self._wanted_lines:
            self._changed.set()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    def full(self) -> bool:
        return not self._room.is_set()

    async def next_batch(self, max_lines: int, max_wait: float) -> Batch:
        self._wanted_lines = max_lines
        while True:
            waiting = self._ready_lines
            if self._ready:
                oldest = self._groups[self._ready[0]].received_at
                if waiting >= max_lines or time.time() - oldest >= max_wait:
                    return self._take(max_lines)
                timeout: float | None = max(0.0, oldest + max_wait - time.time())
            else:
                timeout = None
            self._changed.clear()
            await wait_event(self._changed, timeout)

    def _take(self, max_lines: int) -> Batch:
        ids: list[int] = []
        lines: list[str] = []
        oldest = self._groups[self._ready[0]].received_at
        while self._ready:
            group = self._groups[self._ready[0]]
            if lines and len(lines) + len(group.lines) > max_lines:
                break
            self._ready.pop(0)
            ids.append(group.group_id)
            lines.extend(group.lines)
        self._ready_lines -= len(lines)
        return Batch(ids, lines, oldest)

    async def ack(self, batch: Batch) -> None:
        for group_id in batch.group_ids:
            group = self._groups.pop(group_id, None)
            if group is not None:
                self._lines -= len(group.lines)
                self._bytes -= group.size
        if self._lines < self._max_lines:
            self._room.set()

    async def release(self, batch: Batch) -> None:
        released = [g for g in batch.group_ids if g in self._groups]
        self._ready[:0] = released
        self._ready_lines += sum(len(self._groups[g].lines) for g in released)
        self._changed.set()

    def depth(self) -> tuple[int, int]:
        return self._lines, self._bytes

    async def flush(self) -> None:
        self._seal()

    def storage(self) -> StorageStatus:
        return MEMORY_ONLY


class Checkpoints(Protocol):
    """Small persistent key/value state (e.g. the time of the last Home Assistant event stored)."""

    def load(self, key: str) -> str | None: ...

    async def save(self, key: str, value: str) -> None: ...


class MemoryCheckpoints:
    """Checkpoints that last as long as the process (spool switched off, and tests)."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def load(self, key: str) -> str | None:
        return self._values.get(key)

    async def save(self, key: str, value: str) -> None:
        self._values[key] = value
