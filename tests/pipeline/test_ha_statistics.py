"""Long-term statistics rows → ``ha_statistics`` points."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from ha_ingestor.line_protocol import encode_point
from ha_ingestor.pipeline.ha_statistics import Statistic, StatisticsMapper, period_start_ns

METER = Statistic.from_listing(
    {
        "statistic_id": "sensor.energy",
        "source": "recorder",
        "statistics_unit_of_measurement": "kWh",
        "unit_class": "energy",
        "display_unit_of_measurement": "Wh",
    }
)
mapper = StatisticsMapper(instance="home", static_tags={"site": "a"})


def test_listing_keeps_the_stored_unit_not_the_display_unit() -> None:
    assert Statistic("sensor.energy", "recorder", "kWh", "energy") == METER
    assert METER.units_key == ("energy", "kWh")
    bare = Statistic.from_listing({"statistic_id": "x:y", "source": "x"})
    assert (bare.unit, bare.unit_class) == (None, None)


def test_a_row_becomes_a_point_at_its_period_start() -> None:
    row = {
        "start": 1_764_590_400_000,
        "end": 1_764_594_000_000,
        "state": 12,
        "sum": 3.5,
        "mean": None,
        "last_reset": None,
    }
    point = mapper.point(METER, "hour", row)
    assert point is not None
    assert point.time_ns == 1_764_590_400_000_000_000
    assert point.fields == {"state": 12.0, "sum": 3.5}
    assert all(type(v) is float for v in point.fields.values())
    assert point.tags == {
        "site": "a",
        "statistic_id": "sensor.energy",
        "period": "hour",
        "instance": "home",
        "source": "recorder",
        "unit": "kWh",
    }
    assert encode_point(point) == (
        "ha_statistics,instance=home,period=hour,site=a,source=recorder,"
        "statistic_id=sensor.energy,unit=kWh sum=3.5,state=12.0 1764590400000000000"
    )


def test_rows_without_a_finite_value_are_skipped() -> None:
    assert mapper.point(METER, "5minute", {"start": 0, "mean": None}) is None
    assert mapper.point(METER, "5minute", {"start": 0, "mean": math.nan}) is None
    point = mapper.point(METER, "5minute", {"start": 0, "mean": True, "max": math.inf, "min": 1})
    assert point is not None
    assert point.fields == {"min": 1.0}


def test_unitless_statistic_has_no_unit_tag() -> None:
    statistic = Statistic("counter:x", "counter", None, None)
    point = mapper.point(statistic, "hour", {"start": 0, "sum": 1.0})
    assert point is not None
    assert "unit" not in point.tags
    assert point.tags["source"] == "counter"


def test_iso_start() -> None:
    moment = datetime(2026, 12, 1, 10, tzinfo=UTC)
    expected = int(moment.timestamp()) * 1_000_000_000
    assert period_start_ns({"start": moment.isoformat()}) == expected
    assert period_start_ns({"start": int(moment.timestamp()) * 1000}) == expected
