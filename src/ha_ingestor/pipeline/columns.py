"""Column budgets: a measurement never gains more columns than InfluxDB 3 Core allows.

InfluxDB 3 Core refuses any line that would take a table past 500 columns (time, tags and
fields together). The fixed part of each measurement (its tags and its own fields) is known;
what grows with a home are promoted fields: numeric JSON leaves of MQTT payloads and ``attr_*``
of Home Assistant attributes. Each measurement gets a budget of promoted names: a name already
admitted is always written; a new one is admitted while the budget lasts. Past it, the field is
left out of the point — its value stays in ``payload`` / ``attributes``, which are the record —
counted in ``ha_ingestor_fields_left_out_total{reason="column_budget"}`` and logged once per name.

Admitted names are persisted in the spool database (a checkpoint per measurement), so a restart
neither forgets columns InfluxDB already has nor hands out the same budget twice.

The service and ``ha-ingestor import`` write ``ha_state`` from spools of their own. Each reads
the other's names (a :data:`SharedCheckpoint` reader, read-only) when a budget is made and every
:data:`SHARED_LOOK` seconds after: they count against the same limit, so an import of a
history full of attributes leaves the live service no fewer columns than InfluxDB has room
for, and the other way round. Only names both admit for the first time within one look of each
other can take the table past its budget together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence

import orjson

from ha_ingestor.pipeline.buffer import Checkpoints
from ha_ingestor.telemetry import Telemetry

__all__ = ["ColumnBudget", "ColumnBudgets", "SharedCheckpoint", "promoted_budget"]

CHECKPOINT_PREFIX = "columns."
REASON = "column_budget"
#: Seconds between two reads of the names another process's spool holds.
SHARED_LOOK = 30.0

#: Reads a checkpoint of another process's spool (read-only): the value, or None.
SharedCheckpoint = Callable[[str], str | None]


def promoted_budget(max_columns: int, fixed_columns: int, static_tags: int) -> int | None:
    """Promoted field names a measurement may gain: its share of ``max_columns`` after time,
    tags, its own fields and the static tags (None: ``max_columns`` 0, no limit)."""
    if max_columns == 0:
        return None
    return max(0, max_columns - fixed_columns - static_tags)


class ColumnBudget:
    """The promoted field names one measurement may carry: at most ``limit`` (None: any)."""

    def __init__(
        self,
        measurement: str,
        limit: int | None,
        known: Iterable[str] = (),
        telemetry: Telemetry | None = None,
    ) -> None:
        self.measurement = measurement
        self.limit = limit
        self._admitted: set[str] = set(known)
        self._refused: set[str] = set()
        self._telemetry = telemetry
        self.added: list[str] = []  # admitted since the last save

    @property
    def admitted(self) -> frozenset[str]:
        return frozenset(self._admitted)

    def admit(self, name: str) -> bool:
        """True when ``name`` may be written as a field of this measurement. A refusal is
        logged once per name; the caller counts each field left out with :meth:`left_out`."""
        if name in self._admitted:
            return True
        if self.limit is None or len(self._admitted) < self.limit:
            self._admitted.add(name)
            self.added.append(name)
            return True
        self._log_refusal(name)
        return False

    def know(self, names: Iterable[str]) -> None:
        """Names another process has given this measurement: they count against the limit."""
        self._admitted.update(names)

    def left_out(self, count: int) -> None:
        """Count ``count`` fields left out of points for this budget."""
        if self._telemetry is not None and count:
            self._telemetry.metrics.fields_left_out.labels(self.measurement, REASON).inc(count)

    def _log_refusal(self, name: str) -> None:
        telemetry = self._telemetry
        if telemetry is None:
            return
        if name not in self._refused and len(self._refused) < 10_000:
            self._refused.add(name)  # once per name
            telemetry.log.warning(
                "column budget reached: field not promoted, its value stays in the record",
                measurement=self.measurement,
                field=name,
                budget=self.limit,
            )


class ColumnBudgets:
    """One budget per measurement, persisted as checkpoints of the spool database; ``shared``
    reads the checkpoints of the other spools that write the same measurements."""

    def __init__(
        self,
        checkpoints: Checkpoints,
        telemetry: Telemetry | None = None,
        shared: Sequence[SharedCheckpoint] = (),
    ) -> None:
        self._checkpoints = checkpoints
        self._telemetry = telemetry
        self._shared = list(shared)
        self._budgets: dict[str, ColumnBudget] = {}

    def budget(self, measurement: str, limit: int | None) -> ColumnBudget:
        budget = self._budgets.get(measurement)
        if budget is None:
            known = self._names(self._checkpoints.load(CHECKPOINT_PREFIX + measurement))
            budget = ColumnBudget(measurement, limit, known, self._telemetry)
            for read in self._shared:
                budget.know(self._read_shared(read, measurement))
            self._budgets[measurement] = budget
        return budget

    def refresh(self) -> None:
        """Read the names the other spools hold again (blocking: they are SQLite files)."""
        self._know(self._read_all_shared())

    async def save(self) -> None:
        """Persist the names admitted since the last save."""
        for name, budget in self._budgets.items():
            if budget.added:
                budget.added.clear()
                names = sorted(budget.admitted)
                await self._checkpoints.save(CHECKPOINT_PREFIX + name, orjson.dumps(names).decode())

    async def run(self, interval: float = 1.0) -> None:
        """Save new names as they come (at most once per ``interval``) and read the other
        spools' names every :data:`SHARED_LOOK` seconds, until cancelled."""
        looked = time.monotonic()
        try:
            while True:
                await asyncio.sleep(interval)
                await self.save()
                if self._shared and time.monotonic() - looked >= SHARED_LOOK:
                    looked = time.monotonic()
                    # Read in a thread, applied here: budgets change on the event loop only.
                    self._know(await asyncio.to_thread(self._read_all_shared))
        finally:
            await asyncio.shield(self.save())

    def _read_all_shared(self) -> dict[str, list[str]]:
        return {
            measurement: [
                name for read in self._shared for name in self._read_shared(read, measurement)
            ]
            for measurement in list(self._budgets)
        }

    def _know(self, names: dict[str, list[str]]) -> None:
        for measurement, known in names.items():
            self._budgets[measurement].know(known)

    def _read_shared(self, read: SharedCheckpoint, measurement: str) -> list[str]:
        try:
            return self._names(read(CHECKPOINT_PREFIX + measurement))
        except Exception as exc:  # another process's spool: its trouble must not stop this one
            if self._telemetry is not None:
                self._telemetry.log.warning(
                    "column names of another spool not read",
                    measurement=measurement,
                    error=f"{type(exc).__name__}: {exc}",
                )
            return []

    @staticmethod
    def _names(saved: str | None) -> list[str]:
        if not saved:
            return []
        names = orjson.loads(saved)
        if not isinstance(names, list):
            raise TypeError(f"column names checkpoint is not a list: {saved[:80]!r}")
        return [str(name) for name in names]
