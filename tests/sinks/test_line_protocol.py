"""Line protocol: property-tested against the official client's serializer, and round-tripped
through a real InfluxDB 1.x."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from influxdb_client.client.write.point import DEFAULT_WRITE_PRECISION
from influxdb_client.client.write.point import Point as OraclePoint

from ha_ingestor.record import Point
from ha_ingestor.sinks.line_protocol import encode_point, series_key
from tests.support.servers import InfluxDB1

# Names without backslashes or newlines: there the official client and InfluxDB 1.x/2.x
# disagree (the client escapes backslashes, the server stores them literally), see the module.
name_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="\\\n\r\t"),
    min_size=1,
    max_size=20,
).filter(lambda s: not s.startswith("_") and s.strip() == s and s != "time")
field_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    measurement=name_text,
    tags=st.dictionaries(name_text, name_text, max_size=4),
    fields=st.dictionaries(name_text, field_values, min_size=1, max_size=5),
    time_ns=st.integers(min_value=0, max_value=2**62),
)
def test_encoding_matches_the_official_client(
    measurement: str, tags: dict[str, str], fields: dict[str, object], time_ns: int
) -> None:
    fields = dict(sorted(fields.items()))  # the client sorts fields; their order has no meaning
    ours = encode_point(Point(measurement, tags, fields, time_ns))  # type: ignore[arg-type]
    oracle = OraclePoint(measurement)
    for key, tag in tags.items():
        oracle.tag(key, tag)
    for key, value in fields.items():
        oracle.field(key, value)
    oracle.time(time_ns, DEFAULT_WRITE_PRECISION)
    expected = oracle.to_line_protocol()
    assert normalise_floats(ours) == normalise_floats(expected)


def normalise_floats(line: str) -> str:
    """The client prints floats with repr() too, except that it writes integral floats without
    ".0" ("1" instead of "1.0"): both parse to the same float."""
    return line.replace(".0,", ",").replace(".0 ", " ")


def test_tags_are_sorted_and_empty_values_dropped() -> None:
    assert series_key("m", {"b": "2", "a": "1", "c": ""}) == "m,a=1,b=2"


def test_non_finite_floats_are_skipped_not_written() -> None:
    line = encode_point(Point("m", {}, {"a": math.nan, "b": 1.5, "c": math.inf}, 1))
    assert line == "m b=1.5 1"


def test_awkward_points_round_trip_through_a_real_influxdb(influxdb: InfluxDB1) -> None:
    database = "roundtrip"
    influxdb.create_database(database)
    awkward = [
        "with space",
        "comma,here",
        "equals=sign",
        'double"quote',
        "back\\slash",
        "ünïcödé",
        "emoji 🌡️",
        "trailing backslash\\",
        "a\\,b",
        "tab\there",
    ]
    lines = []
    for i, text in enumerate(awkward):
        point = Point(
            "rt",
            {"tag": text, "i": str(i)},
            {"s": text + ' and "quotes" \\ and\nnewline', "f": 1.5, "n": i, "b": True},
            1000 + i,
        )
        lines.append(encode_point(point))
    influxdb.write(database, "\n".join(lines))
    rows = {row["i"]: row for row in influxdb.rows("SELECT * FROM rt GROUP BY *", database)}
    for i, text in enumerate(awkward):
        row = rows[str(i)]
        expected_tag = text[:-1] + "\uff3c" if text.endswith("\\") else text
        assert row["tag"] == expected_tag
        assert row["s"] == text + ' and "quotes" \\ and\nnewline'
        assert row["f"] == 1.5
        assert row["n"] == i
        assert row["b"] is True
