"""The import's options: times and durations, and what is refused with the option named."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ha_ingestor.importer.options import ImportOptionError, build_options, parse_moment

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NOW_NS = int(NOW.timestamp()) * 1_000_000_000


def _ns(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", _ns(datetime(2026, 11, 1, 12, 0, tzinfo=UTC))),
        ("12h", _ns(datetime(2026, 12, 1, 0, 0, tzinfo=UTC))),
        ("90m", _ns(datetime(2026, 12, 1, 10, 30, tzinfo=UTC))),
        ("2w", _ns(datetime(2026, 11, 17, 12, 0, tzinfo=UTC))),
        ("2026-11-01T00:00:00+01:00", _ns(datetime(2026, 10, 31, 23, 0, tzinfo=UTC))),
        ("2026-11-01T00:00:00Z", _ns(datetime(2026, 11, 1, 0, 0, tzinfo=UTC))),
    ],
)
def test_moments(text: str, expected: int) -> None:
    assert parse_moment("--since", text, NOW_NS) == expected


def test_a_time_without_offset_is_local_time() -> None:
    local = datetime(2026, 11, 1, 8, 30).astimezone()
    assert parse_moment("--since", "2026-11-01T08:30:00", NOW_NS) == _ns(local)


def test_microseconds_are_kept() -> None:
    ns = parse_moment("--until", "2026-11-01T00:00:00.123456+00:00", NOW_NS)
    assert ns % 1_000_000_000 == 123_456_000


def _options(**overrides: object) -> object:
    values: dict[str, object] = {
        "since": "1d",
        "until": None,
        "entities": None,
        "states": True,
        "statistics": True,
        "dry_run": False,
        "now_ns": NOW_NS,
    }
    values.update(overrides)
    return build_options(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "option", "message"),
    [
        ({"since": "2027-01-01T00:00:00Z"}, "--since", "is in the future"),
        ({"since": "yesterday"}, "--since", "neither an ISO 8601 time"),
        ({"until": "2d"}, "--until", "is not after --since"),
        ({"until": "soon"}, "--until", "neither an ISO 8601 time"),
        ({"entities": " , "}, "--entities", "is empty"),
        ({"states": False, "statistics": False}, "--no-states/--no-statistics", "nothing left"),
    ],
)
def test_bad_options_name_the_option(
    overrides: dict[str, object], option: str, message: str
) -> None:
    with pytest.raises(ImportOptionError) as raised:
        _options(**overrides)
    assert raised.value.option == option
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"{option}: ")


def test_identity_is_the_options_as_given() -> None:
    a = build_options(
        since="30d",
        until=None,
        entities="sensor.*, light.x",
        states=True,
        statistics=True,
        dry_run=False,
        now_ns=NOW_NS,
    )
    later = build_options(
        since="30d",
        until=None,
        entities="sensor.*,light.x",
        states=True,
        statistics=True,
        dry_run=False,
        now_ns=NOW_NS + 3_600_000_000_000,
    )
    assert a.entity_globs == ("sensor.*", "light.x")
    assert a.identity == later.identity  # a rerun an hour later resumes the same import
    assert a.since_ns != later.since_ns
