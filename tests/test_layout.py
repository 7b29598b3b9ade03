"""Imports point one way: shared pieces sit below the components that use them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "ha_ingestor"
# A module in the first package may not import from any in the second.
FORBIDDEN = [
    ("sinks", ("ha_ingestor.sources", "ha_ingestor.checks", "ha_ingestor.app")),
    ("pipeline", ("ha_ingestor.sources", "ha_ingestor.sinks", "ha_ingestor.checks")),
    ("sources", ("ha_ingestor.sinks", "ha_ingestor.checks", "ha_ingestor.app")),
]
SHARED = ["line_protocol", "backoff", "tls", "errors", "record"]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("package", "forbidden"), FORBIDDEN)
def test_imports_point_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    offending = {
        f"{path.name} imports {name}"
        for path in (PACKAGE / package).glob("*.py")
        for name in imported_modules(path)
        if name.startswith(forbidden)
    }
    assert not offending


@pytest.mark.timeout(30)
@pytest.mark.parametrize("module", SHARED)
def test_shared_modules_import_nothing_above_them(module: str) -> None:
    above = ("ha_ingestor.sources", "ha_ingestor.sinks", "ha_ingestor.pipeline", "ha_ingestor.app")
    names = imported_modules(PACKAGE / f"{module}.py")
    assert not {name for name in names if name.startswith(above)}


HELPERS = {"Backoff", "CheckError", "client_context", "ssl_context", "ssl_for"}


def describes_exceptions(node: ast.AST) -> bool:
    """A module-level helper that turns an exception into text (whatever it is named)."""
    if not isinstance(node, ast.FunctionDef) or not node.args.args:
        return False
    annotation = node.args.args[0].annotation
    returns = node.returns
    return (
        isinstance(annotation, ast.Name)
        and annotation.id == "BaseException"
        and isinstance(returns, ast.Name)
        and returns.id == "str"
    )


@pytest.mark.timeout(30)
def test_each_shared_helper_is_defined_once() -> None:
    definitions: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text(), str(path)).body:  # module level only
            if not isinstance(node, ast.FunctionDef | ast.ClassDef):
                continue
            name = "describe(exc)" if describes_exceptions(node) else node.name.lstrip("_")
            if name in HELPERS or name == "describe(exc)":
                definitions.setdefault(name, []).append(path.name)
    assert definitions == {
        "Backoff": ["backoff.py"],
        "CheckError": ["errors.py"],
        "client_context": ["tls.py"],
        "describe(exc)": ["errors.py"],
    }
