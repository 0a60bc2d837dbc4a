"""A live backup's planner: the sweep around what the target pushed, paced or not."""

from __future__ import annotations

from typing import Any, cast

from agent.archive.format import Device
from agent.engine import (
    EngineOptions,
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


def test_pushed_copies_are_claimed_and_the_sweep_reads_around_them() -> None:
    """Copies come pushed by the target (BackupEngine.push), never through the planner; the
    sweep then reads only what no push claimed, so nothing is read or recorded twice."""
    s = _Sweep(16 * MiB)
    owned = s.planner.claim_pushed([(2 * MiB + CLUSTER, CLUSTER), (6 * MiB, 2 * MiB)])
    assert owned == [(2 * MiB + CLUSTER, 2 * MiB + 2 * CLUSTER, 0),
                     (6 * MiB, 8 * MiB, CLUSTER)]  # (start, end, position in the parts)
    assert s.planner.claim_pushed([(6 * MiB, CLUSTER)]) == []  # claimed once only
    got = []
    while (item := s.next()) is not None:
        got.append(item)
    assert got == [_Read(s.dev, 0, 2 * MiB),
                   _Read(s.dev, 2 * MiB, CLUSTER),
                   _Read(s.dev, 2 * MiB + 2 * CLUSTER, 2 * MiB - 2 * CLUSTER),
                   _Read(s.dev, 4 * MiB, 2 * MiB)] + [
                   _Read(s.dev, o, 2 * MiB) for o in range(8 * MiB, 16 * MiB, 2 * MiB)]
    assert s.tracker.copied_first == 2 and s.tracker.pushed_bytes == CLUSTER + 2 * MiB


def test_a_paced_sweep_waits_after_its_first_read() -> None:
    s = _Sweep(64 * MiB, PaceSpec(4 * KiB))
    assert s.next() == _Read(s.dev, 0, 2 * MiB)  # the first read goes, then the bucket owes
    assert isinstance(s.next(), _Wait)
    assert isinstance(s.next(), _Wait)  # and keeps waiting


def test_unpaced_sweep_never_waits() -> None:
    s = _Sweep(16 * MiB)
    got = [s.next() for _ in range(9)]
    assert got[:8] == [_Read(s.dev, o, 2 * MiB) for o in range(0, 16 * MiB, 2 * MiB)]
    assert got[8] is None
