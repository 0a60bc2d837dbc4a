"""IntervalSet.claim and run_containing: the bookkeeping of a live backup."""

from __future__ import annotations

import random

from agent.archive.intervals import IntervalSet


def test_claim_returns_only_new_parts() -> None:
    s = IntervalSet()
    assert s.claim(10, 20) == [(10, 20)]
    assert s.claim(15, 30) == [(20, 30)]
    assert s.claim(0, 40) == [(0, 10), (30, 40)]
    assert s.claim(5, 35) == []
    assert s.gaps(50) == [(40, 50)]
    assert s.total == 40


def test_claim_around_several_runs() -> None:
    s = IntervalSet()
    for a in (10, 30, 50):
        s.add(a, a + 5)
    assert s.claim(0, 60) == [(0, 10), (15, 30), (35, 50), (55, 60)]
    assert len(s) == 1 and s.run_containing(59) == (0, 60)


def test_claim_matches_a_byte_model() -> None:
    rng = random.Random(5)
    s = IntervalSet()
    seen = bytearray(1000)
    for _ in range(400):
        a = rng.randrange(1000)
        b = rng.randrange(a + 1, 1001)
        got = s.claim(a, b)
        expect = [i for i in range(a, b) if not seen[i]]
        assert [i for x, y in got for i in range(x, y)] == expect
        for i in expect:
            seen[i] = 1
    assert s.total == sum(seen)


def test_run_containing() -> None:
    s = IntervalSet()
    s.add(100, 200)
    s.add(200, 300)
    s.add(400, 500)
    assert s.run_containing(150) == (100, 300)
    assert s.run_containing(300) is None
    assert s.run_containing(99) is None
    assert s.run_containing(499) == (400, 500)
