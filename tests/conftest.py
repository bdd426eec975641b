"""Fixtures shared by the unit tests (the root conftest.py sets the
environment for every run, notebooks included)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from companion.experiments import _module, run_experiment

_RESULTS: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="session")
def test_scale() -> Callable[[str], dict[str, Any]]:
    """``test_scale(name)``: experiment ``name`` at CONFIG_TEST, seeds 0-2.

    Run once per test session and shared by every test that asks (the
    runs are deterministic, so sharing them hides nothing).
    """

    def get(name: str) -> dict[str, Any]:
        if name not in _RESULTS:
            config = _module(name).CONFIG_TEST
            _RESULTS[name] = run_experiment(name, config=config, seeds=3)
        return _RESULTS[name]

    return get
