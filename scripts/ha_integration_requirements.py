"""Print the Python requirements of the Home Assistant integrations the tests load (and of
everything they depend on), read from the installed Home Assistant's manifests.

Run with Home Assistant's own interpreter: ``.ha-venv/bin/python THIS_FILE``. scripts/bootstrap
installs the result, so starting Home Assistant in a test never installs anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# What tests/support/homeassistant.py puts in configuration.yaml, plus what Home Assistant
# always loads at start-up.
INTEGRATIONS = [
    "http",
    "api",
    "websocket_api",
    "auth",
    "onboarding",
    "config",
    "recorder",
    "history",
    "input_boolean",
    "input_number",
    "template",
    "automation",
    "script",
    "logger",
    "demo",
    "homeassistant",
    "persistent_notification",
    "person",
    "frontend",
    "backup",
    "analytics",
    "hardware",
    "system_log",
    "repairs",
    "sensor",
    "mqtt",
]


def always_loaded() -> list[str]:
    """What this release of Home Assistant sets up without being configured to: since 2024.x
    its bootstrap loads ``DEFAULT_INTEGRATIONS`` (base platforms such as camera and tts among
    them) even without ``default_config``."""
    from homeassistant import bootstrap

    names: set[str] = set()
    for attribute in ("CORE_INTEGRATIONS", "DEFAULT_INTEGRATIONS"):
        names |= set(getattr(bootstrap, attribute, ()))
    return sorted(names)


def main() -> None:
    from homeassistant import components

    root = Path(components.__file__).parent
    seen: set[str] = set()
    requirements: set[str] = set()
    queue = INTEGRATIONS + always_loaded()
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        manifest_path = root / name / "manifest.json"
        if not manifest_path.exists():
            continue
        manifest = json.loads(manifest_path.read_text())
        requirements.update(manifest.get("requirements", []))
        queue += manifest.get("dependencies", []) + manifest.get("after_dependencies", [])
    sys.stdout.write("\n".join(sorted(requirements)) + "\n")


if __name__ == "__main__":
    main()
