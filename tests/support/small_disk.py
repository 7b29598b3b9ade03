"""A small disk of its own (a tmpfs mount, as root) for the spool: fills up for real, can be
remounted read-only, and is unmounted at the end whatever happens."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """``path`` with a file system of ``size`` (``6m``) mounted on it."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` read-only (for root too) while the block runs: a read-only bind mount over it."""
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield
    finally:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the disk at ``path`` up to ``leave`` bytes with one file (another program's)."""
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    ballast = path / "ballast"
    with ballast.open("ab") as out, contextlib.suppress(OSError):
        out.write(bytes(max(0, free - leave)))
    return ballast
