import pytest

from ha_ingestor.pipeline.values import parse_number, to_value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("21.5", 21.5),
        (" -3 ", -3.0),
        ("1e3", 1000.0),
        (".5", 0.5),
        ("nan", None),
        ("inf", None),
        ("-inf", None),
        ("1_000", None),
        ("", None),
        ("12abc", None),
        ("on", None),
    ],
)
def test_parse_number_accepts_only_finite_plain_numbers(text: str, expected: float | None) -> None:
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("ON", 1.0), ("off", 0.0), ("not_home", 0.0), ("Locked", 1.0), ("42", 42.0), ("hello", None)],
)
def test_to_value_maps_boolean_like_words(text: str, expected: float | None) -> None:
    assert to_value(text) == expected
