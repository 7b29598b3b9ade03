"""Home Assistant's long-term statistics → ``ha_statistics`` points (DESIGN §4). Pure functions.

The recorder compiles, per statistic and period (``5minute``, ``hour``), one row holding the
period's ``mean``/``min``/``max`` (measured values) or ``state``/``sum`` (meters). Each row
becomes one point at the period's start, tagged with the statistic, the period, where the
statistic comes from (``source``: ``recorder`` for an entity's, an integration's domain for an
external one) and the unit the recorder stores it in. A row read twice maps to the same series
and time, so a re-import overwrites itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ha_ingestor.pipeline.ha_events import parse_time_ns
from ha_ingestor.record import FieldValue, Point

STATISTICS_MEASUREMENT = "ha_statistics"
PERIODS = ("hour", "5minute")
#: The row fields kept, in the recorder's names.
VALUE_FIELDS = ("mean", "min", "max", "sum", "state")


@dataclass(frozen=True, slots=True)
class Statistic:
    """One entry of ``recorder/list_statistic_ids``: what is needed to ask for its rows in
    the stored unit and to tag them."""

    statistic_id: str
    source: str
    unit: str | None
    unit_class: str | None

    @classmethod
    def from_listing(cls, item: Mapping[str, Any]) -> Statistic:
        unit = item.get("statistics_unit_of_measurement")
        unit_class = item.get("unit_class")
        return cls(
            statistic_id=str(item["statistic_id"]),
            source=str(item.get("source") or ""),
            unit=unit if isinstance(unit, str) and unit else None,
            unit_class=unit_class if isinstance(unit_class, str) and unit_class else None,
        )

    @property
    def units_key(self) -> tuple[str | None, str | None]:
        """Statistics asked for together share this: the ``units`` argument that keeps their
        values in the stored unit is one per unit class."""
        return self.unit_class, self.unit


def period_start_ns(row: Mapping[str, Any]) -> int:
    """A row's ``start`` (epoch milliseconds over the WebSocket API; ISO text in some
    releases' REST-like answers) → ns."""
    start = row["start"]
    if isinstance(start, bool):
        raise TypeError("start is not a time")
    if isinstance(start, int | float):
        return int(start) * 1_000_000
    return parse_time_ns(str(start))


@dataclass
class StatisticsMapper:
    """Turns statistics rows into points with the tags of one configuration."""

    instance: str
    static_tags: dict[str, str]

    def point(self, statistic: Statistic, period: str, row: Mapping[str, Any]) -> Point | None:
        """The row's point; None when it holds no finite value (nothing to store)."""
        fields: dict[str, FieldValue] = {}
        for name in VALUE_FIELDS:
            value = row.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                fields[name] = float(value)
        if not fields:
            return None
        tags = {
            **self.static_tags,
            "statistic_id": statistic.statistic_id,
            "period": period,
            "instance": self.instance,
        }
        if statistic.source:
            tags["source"] = statistic.source
        if statistic.unit:
            tags["unit"] = statistic.unit
        return Point(STATISTICS_MEASUREMENT, tags, fields, period_start_ns(row))
