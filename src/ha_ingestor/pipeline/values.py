"""Turning text into the numbers the schema stores in ``value`` fields.

Shared by MQTT payloads and Home Assistant states so the same word means the same number
everywhere.
"""

from __future__ import annotations

import math

#: Words that mean on (1.0) or off (0.0), compared case-insensitively.
BOOLEAN_WORDS: dict[str, float] = {
    "on": 1.0,
    "off": 0.0,
    "true": 1.0,
    "false": 0.0,
    "yes": 1.0,
    "no": 0.0,
    "open": 1.0,
    "opening": 1.0,
    "closed": 0.0,
    "closing": 0.0,
    "home": 1.0,
    "not_home": 0.0,
    "locked": 1.0,
    "unlocked": 0.0,
    "online": 1.0,
    "offline": 0.0,
    "detected": 1.0,
    "clear": 0.0,
    "active": 1.0,
    "inactive": 0.0,
    "connected": 1.0,
    "disconnected": 0.0,
}

_NUMBER_START = frozenset("0123456789+-.")


def parse_number(text: str) -> float | None:
    """A finite float if ``text`` is a plain decimal number (no ``nan``/``inf``/``1_000``)."""
    text = text.strip()
    if not text or text[0] not in _NUMBER_START or "_" in text:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def to_value(text: str) -> float | None:
    """The float a state or payload stands for: a number or a boolean-like word, else None."""
    number = parse_number(text)
    if number is not None:
        return number
    return BOOLEAN_WORDS.get(text.strip().lower())
