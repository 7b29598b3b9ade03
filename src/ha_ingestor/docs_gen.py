"""Generate docs/configuration.md from the settings model: ``python -m ha_ingestor.docs_gen``."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Any

from pydantic import SecretStr

from ha_ingestor.config import SECRET_FIELDS, Settings, env_name

HEADER = """# Configuration reference

HA Ingestor is configured only through environment variables. Every secret can instead be read
from a file: set `<VARIABLE>_FILE` to its path (Docker and Kubernetes secrets). An unknown
`HA_INGESTOR_*` variable, or an invalid value, stops start-up with a message naming the variable.

This page is generated from the settings model (`python -m ha_ingestor.docs_gen`); a test fails
when the two disagree.

| variable | type | default | meaning |
|---|---|---|---|
"""


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " / ".join(f"`{member.value}`" for member in annotation)
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = text.replace("pathlib.", "").replace(" | None", "")
    return {
        "list[str]": "list",
        "Path": "path",
        "bool": "`true` / `false`",
        "str": "text",
        "int": "integer",
        "float": "number",
    }.get(text, text)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "computed"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "unset"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`"


_FACTORY_DEFAULTS = {
    "mqtt_topics": "`#`",
    "mqtt_exclude_topics": "none",
    "mqtt_client_id": "`ha-ingestor-<hostname>`",
    "ha_event_types": "all",
    "ha_exclude_event_types": "none",
    "ha_include_entities": "all",
    "ha_exclude_entities": "none",
    "ha_exclude_attributes": "none",
    "tags": "none",
}


def render() -> str:
    lines = [HEADER]
    for name, field in Settings.model_fields.items():
        default = _FACTORY_DEFAULTS.get(name) or _default(field)
        kind = "secret" if name in SECRET_FIELDS else _type_name(field.annotation)
        if name == "tags":
            kind = "`k=v` pairs, comma-separated"
        description = (field.description or "").replace("|", "\\|")
        variable = f"`{env_name(name)}`"
        if name in SECRET_FIELDS:
            variable += f"<br>`{env_name(name)}_FILE`"
        lines.append(f"| {variable} | {kind} | {default} | {description} |\n")
    return "".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
