"""IntervalSet as a B+ tree (issue #13): ranges in any order cost O(log n) each, and the set
still detects every overlap, merges every touching pair and lists every gap exactly as
a byte-by-byte model does."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.archive import intervals
from agent.archive.intervals import IntervalSet, Overlap

N = 200_000


def _depth_bound(n: int) -> int:
    """The depth of a B+ tree of ``n`` ranges whose nodes split in halves: every node
    but the root holds FANOUT / 2 entries or more."""
    return 2 + math.ceil(math.log(max(n, 2)) / math.log(intervals.FANOUT // 2))


def _orders() -> Iterator[tuple[str, list[int]]]:
    yield "ascending", list(range(N))
    yield "descending", list(range(N - 1, -1, -1))
    yield "random", random.Random(3).sample(range(N), N)
    # Outside in: each range lands between the two ends of the set so far.
    yield "alternating", [i // 2 if i % 2 == 0 else N - 1 - i // 2 for i in range(N)]


@pytest.mark.parametrize(("name", "order"), list(_orders()), ids=[n for n, _ in _orders()])
@pytest.mark.slow
def test_any_order_keeps_every_path_short_and_every_node_small(
        name: str, order: list[int]) -> None:
    """By construction, each add walks one root-to-leaf path and shifts at most FANOUT
    entries in each node on it: a depth within log(n) is a cost within O(log n). The
    sorted list this replaced shifted every range after the new one (descending with
    gaps: all of them, 200,000 records in 36 s)."""
    s = IntervalSet()
    for i in order:
        s.add(i * 10, i * 10 + 5)  # gaps of 5 bytes: nothing merges
    assert len(s) == N and s.total == 5 * N
    assert s._audit() <= _depth_bound(N)
    for i in order:
        s.add(i * 10 + 5, i * 10 + 10)  # fill the gaps: everything merges into one range
    assert len(s) == 1 and s.gaps(10 * N) == [] and s._audit() == 1


@pytest.fixture
def tiny_nodes() -> Iterator[None]:
    """Nodes of 4 entries: a few dozen ranges make a tree several levels deep."""
    saved = intervals.FANOUT
    intervals.FANOUT = 4
    try:
        yield
    finally:
        intervals.FANOUT = saved


SPACE = 400
_range = st.tuples(st.integers(0, SPACE - 1), st.integers(1, 40)).map(
    lambda t: (t[0], min(SPACE, t[0] + t[1])))


def _runs(present: bytearray) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i, b in enumerate(present):
        if b:
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(_range, max_size=150), st.lists(_range, max_size=10))
def test_the_tree_matches_a_byte_model(
        adds: list[tuple[int, int]], queries: list[tuple[int, int]]) -> None:
    saved = intervals.FANOUT
    intervals.FANOUT = 4  # deep trees from few ranges (not a fixture: hypothesis reruns)
    try:
        s = IntervalSet()
        present = bytearray(SPACE)
        for a, b in adds:
            first = next((i for i in range(a, b) if present[i]), None)
            if first is None:
                s.add(a, b)
                present[a:b] = b"\1" * (b - a)
            else:
                with pytest.raises(Overlap) as e:
                    s.add(a, b)
                last = first
                while last < b and present[last]:
                    last += 1
                assert (e.value.start, e.value.end) == (first, last)
            s._audit()
            assert len(s) == len(_runs(present)) and s.total == sum(present)
        runs = _runs(present)
        assert s.gaps(SPACE) == [(x, y) for x, y in _complement(runs)]
        for a, b in queries:
            want = [r for r in _complement(runs) if r[0] < b and r[1] > a]
            assert s.missing(a, b) == [(max(x, a), min(y, b)) for x, y in want]
            holding = [r for r in runs if r[0] <= a < r[1]]
            assert s.run_containing(a) == (holding[0] if holding else None)
    finally:
        intervals.FANOUT = saved


def _complement(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for a, b in runs:
        if a > pos:
            out.append((pos, a))
        pos = b
    if pos < SPACE:
        out.append((pos, SPACE))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(_range, max_size=120))
def test_claim_matches_a_byte_model_in_deep_trees(claims: list[tuple[int, int]]) -> None:
    saved = intervals.FANOUT
    intervals.FANOUT = 4
    try:
        s = IntervalSet()
        present = bytearray(SPACE)
        for a, b in claims:
            got = s.claim(a, b)
            expect = [i for i in range(a, b) if not present[i]]
            assert [i for x, y in got for i in range(x, y)] == expect
            for i in expect:
                present[i] = 1
            s._audit()
        assert len(s) == len(_runs(present))
    finally:
        intervals.FANOUT = saved


def test_removing_ranges_shrinks_the_tree(tiny_nodes: None) -> None:
    """Ranges merged away leave no empty node behind, and the root steps down."""
    s = IntervalSet()
    for i in range(200):
        s.add(i * 4, i * 4 + 2)
    deep = s._audit()
    assert deep >= 4
    for i in reversed(range(200)):
        s.add(i * 4 + 2, i * 4 + 4)
    assert len(s) == 1 and s._audit() == 1 and s.run_containing(0) == (0, 800)
