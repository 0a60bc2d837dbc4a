"""DeviceTracker: which whole clusters a written range releases (pure logic)."""

from __future__ import annotations

from agent.tracker import DeviceTracker

C = 64 * 1024


def tracker(size: int, partial_tail: bool = True) -> tuple[DeviceTracker, list[tuple[int, int]]]:
    released: list[tuple[int, int]] = []
    t = DeviceTracker(size, C, lambda off, n: released.append((off, n)),
                      partial_tail=partial_tail)
    return t, released


def test_a_cluster_is_released_when_its_last_byte_is_written() -> None:
    t, released = tracker(4 * C)
    t.written(0, C // 2)
    assert released == []
    t.written(C // 2, C + 100)  # completes cluster 0, starts cluster 1
    assert released == [(0, C)]
    t.written(3 * C, C)
    t.written(C + C // 2 + 100, 2 * C - C // 2 - 100)  # completes 1 and 2 (3 is done)
    assert released == [(0, C), (3 * C, C), (C, 2 * C)]
    assert t.released_bytes == 4 * C


def test_the_partial_last_cluster_of_an_odd_sized_disk_is_released() -> None:
    size = 3 * C + 4608
    t, released = tracker(size)
    t.written(3 * C, 1000)  # part of the last cluster: not yet
    assert released == []
    t.written(3 * C + 1000, 3608)  # its last byte: released up to the end of the disk
    assert released == [(3 * C, 4608)]
    t.written(0, 3 * C)
    assert released[-1] == (0, 3 * C)
    assert t.released_bytes == size


def test_a_qemu_that_cannot_release_a_partial_cluster_is_not_asked_to() -> None:
    # QEMU 9.x/10.x round snapshot trims inward themselves (agent.qemu.caps).
    size = 3 * C + 4608
    t, released = tracker(size, partial_tail=False)
    t.written(3 * C, 4608)
    assert released == []
    t.written(0, 3 * C)
    assert released == [(0, 3 * C)]
    assert t.released_bytes == 3 * C


def test_skipped_ranges_release_with_the_written_ranges_they_touch() -> None:
    # An incremental: clusters 1, 4 and 6 changed; the planner skips the clean rest.
    t, released = tracker(8 * C)
    t.skip(0, C)
    t.skip(2 * C, 4 * C)
    t.skip(5 * C, 6 * C)
    t.skip(7 * C, 8 * C)
    assert released == []  # skipping alone releases nothing
    t.written(4 * C, C)
    assert released == [(2 * C, 4 * C)]  # cluster 4 and the clean clusters around it
    t.written(C, C)
    assert released[-1] == (0, 2 * C)  # not cluster 2 again
    t.written(6 * C, C)
    assert released[-1] == (6 * C, 2 * C)
    assert t.released_bytes == 8 * C
    assert sum(n for _, n in released) == 8 * C  # every byte once


def test_skipped_ranges_are_claimed() -> None:
    t, _ = tracker(4 * C)
    t.skip(C, 3 * C)
    assert t.claim(0, 4 * C) == [(0, C), (3 * C, 4 * C)]
    assert t.unclaimed(0, 4 * C) == []


def test_a_skip_between_released_runs_is_released_by_the_next_write_of_its_run() -> None:
    t, released = tracker(6 * C)
    t.written(0, C)
    t.written(2 * C, C)
    assert released == [(0, C), (2 * C, C)]
    t.skip(C, 2 * C)  # joins two released runs: nothing written, nothing released
    assert len(released) == 2
    t.written(3 * C, C)  # the run is now [0, 4C): cluster 1 and 3 are not released yet
    assert released[2:] == [(C, C), (3 * C, C)]
