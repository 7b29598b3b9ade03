"""The spool's disk, as a fault domain: what went wrong, what to tell the user, and room.

Errors of SQLite and of the operating system are translated once, here, into a
:class:`StorageState`; the spool keeps one :class:`StorageFault` while a state lasts (so it is
logged once per change, not once per retry). :class:`SpaceReserve` holds a small file whose
space is given back when the disk fills, so that the WAL can still be checkpointed and written
groups deleted; :func:`free_bytes` tells how much of the disk is still free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class StorageState(StrEnum):
    OK = "ok"
    DISK_FULL = "disk_full"
    READ_ONLY = "read_only"
    IO_ERROR = "io_error"
    MISSING = "missing"  # the spool file or its directory was removed under the service
    CORRUPT = "corrupt"


#: What the user should do, per state (logged with the fault and shown by ``/readyz``).
ADVICE: dict[StorageState, str] = {
    StorageState.DISK_FULL: "free space on the spool's disk; spooled data keeps draining to "
    "InfluxDB and new data waits at its source until it can be stored",
    StorageState.READ_ONLY: "make HA_INGESTOR_SPOOL_DIR writable again (a disk remounted "
    "read-only after errors needs checking); new data waits at its source meanwhile",
    StorageState.IO_ERROR: "check the disk holding HA_INGESTOR_SPOOL_DIR (kernel log); new data "
    "waits at its source while writes fail",
    StorageState.MISSING: "the spool file or directory was removed; it is recreated from what "
    "the service still holds as soon as the directory can be written",
    StorageState.CORRUPT: "the spool file is damaged; it is moved aside and rebuilt from what "
    "the service still holds",
}

_SQLITE_STATES = (
    ("SQLITE_FULL", StorageState.DISK_FULL),
    ("SQLITE_READONLY", StorageState.READ_ONLY),
    ("SQLITE_CORRUPT", StorageState.CORRUPT),
    ("SQLITE_NOTADB", StorageState.CORRUPT),
    ("SQLITE_CANTOPEN", StorageState.MISSING),
    ("SQLITE_IOERR", StorageState.IO_ERROR),
)
_ERRNO_STATES = {
    errno.ENOSPC: StorageState.DISK_FULL,
    errno.EDQUOT: StorageState.DISK_FULL,
    errno.EROFS: StorageState.READ_ONLY,
    errno.EACCES: StorageState.READ_ONLY,
    errno.EPERM: StorageState.READ_ONLY,
    errno.ENOENT: StorageState.MISSING,
}


def classify(exc: BaseException, directory: Path | None = None) -> StorageState:
    """The storage state an exception of SQLite or the OS stands for. With ``directory``, a
    generic I/O error is refined by looking at the disk (read-only mount, no space left)."""
    state = _classify(exc)
    if state == StorageState.IO_ERROR and directory is not None:
        with contextlib.suppress(OSError):
            stat = os.statvfs(directory)
            if stat.f_flag & os.ST_RDONLY:
                return StorageState.READ_ONLY
            if stat.f_bavail * stat.f_frsize < _NEARLY_FULL:
                return StorageState.DISK_FULL
    return state


#: Less free space than this, and a failed write is put down to a full disk.
_NEARLY_FULL = 64 * 1024


def _classify(exc: BaseException) -> StorageState:
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", None) or ""
        for prefix, state in _SQLITE_STATES:
            if name.startswith(prefix):
                return state
        text = str(exc).lower()
        if "disk is full" in text:
            return StorageState.DISK_FULL
        if "readonly" in text or "read-only" in text:
            return StorageState.READ_ONLY
        if "malformed" in text or "not a database" in text:
            return StorageState.CORRUPT
        return StorageState.IO_ERROR
    if isinstance(exc, OSError) and exc.errno in _ERRNO_STATES:
        return _ERRNO_STATES[exc.errno]
    return StorageState.IO_ERROR


@dataclass(frozen=True, slots=True)
class StorageFault:
    """Why the spool cannot make new data durable, since when."""

    state: StorageState
    error: str
    since: float

    @property
    def advice(self) -> str:
        return ADVICE.get(self.state, "")


class SpoolFileMissingError(FileNotFoundError):
    """The spool file is no longer the one the service opened (deleted or replaced)."""


def free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still use on ``directory``'s file system."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


class SpaceReserve:
    """A file of ``size`` bytes next to the spool, deleted when the disk is full: the space it
    gives back lets SQLite checkpoint its WAL into the database and delete what InfluxDB has
    stored, so the spool drains instead of seizing up. Made again once space returns."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    @property
    def held(self) -> bool:
        return self.path.exists()

    def make(self) -> bool:
        """Allocate the reserve; False (and nothing left behind) when there is no room."""
        if self.size <= 0 or self.held:
            return self.held
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return False
        try:
            try:
                os.posix_fallocate(fd, 0, self.size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.write(fd, bytes(self.size))  # a file system without fallocate
            os.fsync(fd)
        except OSError:
            os.close(fd)
            self.release()
            return False
        os.close(fd)
        return True

    def release(self) -> bool:
        """Give the space back; True when there was a reserve to give."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError:
            return False
        return True

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
