"""The engine's pure planning helpers."""

from __future__ import annotations

import os

import pytest

from agent.engine import EngineOptions, _between
from agent.errors import InvalidArgument


def test_between_gives_the_clean_ranges_around_the_changed_runs() -> None:
    assert list(_between(0, 100, [(10, 20), (50, 60)])) == [(0, 10), (20, 50), (60, 100)]
    assert list(_between(0, 100, [(0, 20), (80, 100)])) == [(20, 80)]
    assert list(_between(0, 100, [(0, 100)])) == []
    assert list(_between(40, 100, [])) == [(40, 100)]


def test_connections_default_to_one_for_an_incremental_and_obey_the_user() -> None:
    auto = EngineOptions()
    assert auto.connections_for(changes=True) == 1
    assert 1 <= auto.connections_for(changes=False) <= 4
    assert auto.connections_for(changes=False) == max(1, min(4, os.cpu_count() or 1))
    given = EngineOptions(connections=3)
    assert given.connections_for(changes=True) == given.connections_for(changes=False) == 3


def test_connections_must_be_positive() -> None:
    with pytest.raises(InvalidArgument):
        EngineOptions(connections=0)
