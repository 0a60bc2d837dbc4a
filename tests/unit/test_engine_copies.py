"""A live backup's planner: copies first, gathered, never paced; the sweep paced."""

from __future__ import annotations

from typing import Any, cast

from agent.archive.format import Device
from agent.engine import (
    GATHER_PARTS,
    MAX_REQUEST,
    EngineOptions,
    _Gather,
    _Planner,
    _Read,
    _SweepGate,
    _Wait,
)
from agent.nbd.source import NbdSource
from agent.pace import PaceSpec
from agent.pipeline import Control
from agent.tracker import DeviceTracker

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB


class _Sweep:
    """A planner whose sweep yields whole-disk reads of ``request_size`` without NBD."""

    def __init__(self, size: int, spec: PaceSpec | None = None) -> None:
        self.dev = Device(0, "vda", size)
        self.opts = EngineOptions(request_size=2 * MiB)
        self.tracker = DeviceTracker(size, CLUSTER, lambda off, n: None)
        self.gate = _SweepGate(spec, [self.tracker]) if spec is not None else None
        self.planner = _Planner(self.dev, cast(NbdSource, None), self.opts, Control(),
                                self.tracker, self.gate)
        # the sweep, as block status would give it for a disk of data
        reads = (_Read(self.dev, o, min(2 * MiB, size - o)) for o in range(0, size, 2 * MiB))
        cast(Any, self.planner)._it = iter(reads)

    def next(self) -> object:
        return cast(Any, self.planner)._next()


def test_scattered_copies_are_read_as_gathers() -> None:
    s = _Sweep(64 * MiB)
    clusters = [i * 3 * CLUSTER for i in range(40)]  # never adjacent
    for off in clusters:
        s.tracker.copied(off, CLUSTER)
    got = [s.next() for _ in range(3)]
    assert [type(g) for g in got] == [_Gather, _Gather, _Gather]
    parts = [p for g in got for p in cast(_Gather, g).parts]
    assert parts == [(off, CLUSTER) for off in clusters]
    assert [len(cast(_Gather, g).parts) for g in got] == [GATHER_PARTS, GATHER_PARTS, 8]
    assert isinstance(s.next(), _Read)  # then the sweep
    assert s.tracker.copied_first == 40


def test_a_gather_of_copies_stays_within_one_request_and_large_copies_go_alone() -> None:
    s = _Sweep(64 * MiB)
    s.tracker.copied(0, CLUSTER)
    s.tracker.copied(8 * MiB, MiB)  # a copy larger than one NBD request
    s.tracker.copied(16 * MiB, CLUSTER)
    first, second, third = s.next(), s.next(), s.next()
    assert first == _Read(s.dev, 0, CLUSTER)
    assert second == _Read(s.dev, 8 * MiB, MiB) and MiB > MAX_REQUEST
    assert third == _Read(s.dev, 16 * MiB, CLUSTER)


def test_copies_pass_a_sweep_that_must_wait() -> None:
    s = _Sweep(64 * MiB, PaceSpec(4 * KiB))
    first = s.next()
    assert first == _Read(s.dev, 0, 2 * MiB)  # the first read goes, then the bucket owes
    assert isinstance(s.next(), _Wait)
    s.tracker.copied(32 * MiB, CLUSTER)
    s.tracker.copied(48 * MiB, CLUSTER)
    assert s.next() == _Gather(s.dev, ((32 * MiB, CLUSTER), (48 * MiB, CLUSTER)))
    assert isinstance(s.next(), _Wait)  # and the sweep still waits


def test_unpaced_sweep_never_waits() -> None:
    s = _Sweep(16 * MiB)
    got = [s.next() for _ in range(9)]
    assert got[:8] == [_Read(s.dev, o, 2 * MiB) for o in range(0, 16 * MiB, 2 * MiB)]
    assert got[8] is None
