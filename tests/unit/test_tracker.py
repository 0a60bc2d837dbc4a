"""DeviceTracker: which whole clusters a written range releases (pure logic)."""

from __future__ import annotations

from agent.tracker import DeviceTracker

C = 64 * 1024


def tracker(size: int) -> tuple[DeviceTracker, list[tuple[int, int]]]:
    released: list[tuple[int, int]] = []
    return DeviceTracker(size, C, lambda off, n: released.append((off, n))), released


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
