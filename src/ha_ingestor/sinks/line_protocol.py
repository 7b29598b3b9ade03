r"""InfluxDB line protocol, escaped the way InfluxDB's parsers read it.

``measurement[,tag=value...] field=value[,field=value...] timestamp``

- measurement: escape ``,`` and space; tag keys, tag values and field keys: escape ``,``, ``=``
  and space. Empty tag values are dropped.
- Backslashes in names and tag values are written as they are: InfluxDB 1.x and 2.x store
  ``\\`` there as two characters (only ``\,``, ``\=`` and ``\ `` are escapes), so escaping
  them, as the official Python client does, would double every backslash in the stored value.
  Two cases have no exact form: a trailing backslash (it would escape the separator after it) is
  written as U+FF3C, and a newline is written as the two characters ``\n``.
- String field values: double-quoted, ``"`` and ``\`` escaped; newlines kept as they are.
- Floats in their shortest round-trip form, integers with an ``i`` suffix, booleans as
  ``true``/``false``; NaN and infinities have no representation and are refused.
"""

from __future__ import annotations

import math

from ha_ingestor.record import FieldValue, Point

_MEASUREMENT = str.maketrans({",": "\\,", " ": "\\ ", "\n": "\\n"})
_KEY = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", "\n": "\\n"})
_SPECIAL = frozenset(",= \n\\")
_TRAILING_BACKSLASH = "\uff3c"


def _end(text: str) -> str:
    return text[:-1] + _TRAILING_BACKSLASH if text.endswith("\\") else text


def escape_measurement(name: str) -> str:
    return _end(name.translate(_MEASUREMENT))


def escape_tag(text: str) -> str:
    """Escape a tag key, tag value or field key."""
    if _SPECIAL.isdisjoint(text):
        return text
    return _end(text.translate(_KEY))


escape_field_key = escape_tag


def escape_string(text: str) -> str:
    """A quoted string field value."""
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if '"' in text:
        text = text.replace('"', '\\"')
    return '"' + text + '"'


def format_field_value(value: FieldValue) -> str:
    # bool before int: bool is a subclass of int.
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} cannot be written as an InfluxDB float")
        return repr(value)
    return escape_string(value)


def series_key(measurement: str, tags: dict[str, str]) -> str:
    """``measurement,k=v,...`` with tags sorted by key and empty values left out."""
    parts = [escape_measurement(measurement)]
    for key in sorted(tags):
        value = tags[key]
        if value and key:
            parts.append(f"{escape_tag(key)}={escape_tag(value)}")
    return ",".join(parts)


def encode_fields(fields: dict[str, FieldValue]) -> str:
    """``k=v,...``; non-finite floats are skipped (they have no line-protocol form)."""
    encoded = []
    for key, value in fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            continue
        encoded.append(f"{escape_field_key(key)}={format_field_value(value)}")
    return ",".join(encoded)


def encode_line(series: str, fields: str, time_ns: int) -> str:
    return f"{series} {fields} {time_ns}"


def encode_point(point: Point) -> str:
    """One line (no trailing newline). Raises ValueError for a point without fields."""
    fields = encode_fields(point.fields)
    if not fields:
        raise ValueError(f"point of {point.measurement} has no fields")
    return encode_line(series_key(point.measurement, point.tags), fields, point.time_ns)
