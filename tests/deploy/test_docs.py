"""The documentation keeps up with the code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def logged_messages() -> set[str]:
    """Fixed messages of every warning and error the service logs."""
    messages = set()
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("error", "warning", "warn_throttled", "critical")
            ):
                for arg in node.args:
                    if (
                        isinstance(arg, ast.Constant)
                        and isinstance(arg.value, str)
                        and " " in arg.value
                    ):
                        messages.add(arg.value)
    return messages


def test_every_logged_warning_and_error_is_explained_in_troubleshooting() -> None:
    guide = (ROOT / "docs/troubleshooting.md").read_text()
    messages = logged_messages()
    assert len(messages) > 5
    missing = sorted(m for m in messages if f"`{m}`" not in guide)
    assert not missing, f"add these to docs/troubleshooting.md: {missing}"


def test_readme_links_every_doc_and_lists_every_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    for doc in (ROOT / "docs").glob("*.md"):
        assert f"docs/{doc.name}" in readme or doc.name in (ROOT / "docs/index.md").read_text()
    from prometheus_client import CollectorRegistry

    from ha_ingestor.telemetry import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    for family in registry.collect():
        assert family.name in readme, f"README lists {family.name}"
    for endpoint in ("/healthz", "/readyz", "/metrics", "/status"):
        assert f"`GET {endpoint}`" in readme
