"""Home Assistant fixtures: one shared instance per session (starting it takes a while) and a
private one for tests that stop, kill or restart it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.homeassistant import HomeAssistant
from tests.support.servers import started


@pytest.fixture(scope="session")
def home_assistant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HomeAssistant]:
    """One Home Assistant for the session. Tests must not stop it or rely on its entities
    being untouched by other tests: use entity ids of their own."""
    with started(HomeAssistant(tmp_path_factory.mktemp("homeassistant"))) as server:
        yield server


@pytest.fixture
def fresh_home_assistant(tmp_path: Path) -> Iterator[HomeAssistant]:
    """A Home Assistant of the test's own, for tests that stop, kill or restart it."""
    with started(HomeAssistant(tmp_path / "homeassistant")) as server:
        yield server
