"""The engine's pure planning helpers."""

from __future__ import annotations

import itertools
import os

import pytest

from agent.archive.format import Device
from agent.engine import MAX_REQUEST, EngineOptions, _between, _Gather, _Read, _requests
from agent.errors import InvalidArgument

MiB = 1 << 20


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


def test_a_read_is_sent_as_requests_of_at_most_max_request() -> None:
    dev = Device(0, "vda", 8 * MiB)
    read = _Read(dev, MiB, 2 * MiB + 4096)
    reqs = _requests(read)
    assert all(n <= MAX_REQUEST for _, n in reqs)
    assert reqs[0][0] == MiB and sum(n for _, n in reqs) == 2 * MiB + 4096
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(reqs))  # contiguous
    gather = _Gather(dev, ((0, 65536), (MiB, 65536)))
    assert _requests(gather) == gather.parts  # a gather's parts are requests already
