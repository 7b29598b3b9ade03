"""Reading a checkpoint of a spool that another process holds open."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ha_ingestor.pipeline.spool import SPOOL_FILE, SpoolError, SqliteSpool, read_checkpoint
from ha_ingestor.telemetry import Telemetry


async def test_reads_what_the_open_spool_committed(tmp_path: Path) -> None:
    async with SqliteSpool(tmp_path, Telemetry(CollectorRegistry())) as spool:
        assert read_checkpoint(tmp_path, "homeassistant.last_event") is None
        await spool.save("homeassistant.last_event", "2026-12-01T10:00:00.000001+00:00")
        await spool.flush()
        assert read_checkpoint(tmp_path, "homeassistant.last_event") == (
            "2026-12-01T10:00:00.000001+00:00"
        )
        spool.add("m f=1 1")
        await spool.flush()
        # Reading took no part in the spool: the writer still owns its group.
        assert spool.depth()[0] == 1


def test_no_spool_is_no_checkpoint(tmp_path: Path) -> None:
    assert read_checkpoint(tmp_path / "missing", "k") is None
    assert not (tmp_path / "missing").exists()


def test_an_unreadable_spool_is_an_error(tmp_path: Path) -> None:
    (tmp_path / SPOOL_FILE).write_bytes(b"not a database" * 100)
    with pytest.raises(SpoolError, match=SPOOL_FILE):
        read_checkpoint(tmp_path, "k")
