"""The one record type that flows from the sources through the pipeline to the sink."""

from __future__ import annotations

from dataclasses import dataclass

FieldValue = float | int | bool | str


@dataclass(slots=True)
class Point:
    """One InfluxDB point, before encoding.

    Field types follow the schema's rules: a field name always carries one Python type
    (``float`` for measured values, ``int`` for counts, ``bool`` for flags, ``str`` for text).
    """

    measurement: str
    tags: dict[str, str]
    fields: dict[str, FieldValue]
    time_ns: int
