"""The engine's pure planning helpers."""

from __future__ import annotations

from agent.engine import _between


def test_between_gives_the_clean_ranges_around_the_changed_runs() -> None:
    assert list(_between(0, 100, [(10, 20), (50, 60)])) == [(0, 10), (20, 50), (60, 100)]
    assert list(_between(0, 100, [(0, 20), (80, 100)])) == [(20, 80)]
    assert list(_between(0, 100, [(0, 100)])) == []
    assert list(_between(40, 100, [])) == [(40, 100)]
