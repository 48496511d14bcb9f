"""The test suite never writes into the user's tuneguard cache or run history."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def seen_by_a_module_fixture() -> dict[str, str]:
    """What a module-scoped fixture that trains (tests/e2e, test_check, test_lr...) and its subprocesses see."""
    return {key: os.environ.get(key, "") for key in ("TUNEGUARD_HOME", "TUNEGUARD_CACHE")}


def test_module_fixtures_see_the_isolated_home(seen_by_a_module_fixture: dict[str, str],
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    assert Path(seen_by_a_module_fixture["TUNEGUARD_HOME"]).parent == tmp_path_factory.getbasetemp()
    assert seen_by_a_module_fixture["TUNEGUARD_CACHE"]
