"""FileTarget's writeback windows: which written ranges are settled, and when."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

from agent.nbd.target import FileTarget, WritebackWindows, coalesce

M = 1024 * 1024


def test_coalesce_sorts_and_merges_touching_and_overlapping_ranges() -> None:
    assert coalesce([]) == []
    assert coalesce([(4 * M, M), (0, M), (M, M), (10 * M, M), (1536 * 1024, M)]) == [
        (0, 2560 * 1024), (4 * M, M), (10 * M, M)]
    assert coalesce([(0, 8 * M), (M, M)]) == [(0, 8 * M)]  # contained


def test_nothing_is_due_until_the_window_after_it_fills() -> None:
    w = WritebackWindows(window=4 * M)
    assert w.add(0, 2 * M) == []
    assert w.add(2 * M, 2 * M) == []  # first window full; nothing before it
    assert w.add(6 * M, 2 * M) == []
    # The second window fills: the first is due, merged into one range.
    assert w.add(4 * M, 2 * M) == [(0, 4 * M)]
    assert w.add(9 * M, 8 * M) == [(4 * M, 4 * M)]  # one write may fill a window


def test_every_write_is_due_exactly_once_across_threads() -> None:
    w = WritebackWindows(window=3 * M)
    due: list[tuple[int, int]] = []
    lock = threading.Lock()

    def writer(first: int) -> None:
        for i in range(first, 400, 4):
            got = w.add(i * M, M)
            with lock:
                due.extend(got)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 400 writes fill 133 windows of three; all but the last are due (the one
    # being filled holds the last write), and no byte is due twice.
    covered = sorted(due)
    assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(covered))
    assert sum(n for _, n in due) == 132 * 3 * M


def test_a_file_target_settles_and_still_holds_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    t = FileTarget(str(path), 64 * M, fresh=True)
    t._writeback = WritebackWindows(window=4 * M)  # settle often in a small file
    blocks = {off: os.urandom(M) for off in range(0, 64 * M, 2 * M)}
    try:
        for off in sorted(blocks, reverse=True):
            t.write(off, blocks[off])
        t.flush()
    finally:
        t.close()
    with open(path, "rb") as f:
        for off, data in blocks.items():
            f.seek(off)
            assert f.read(M) == data
            assert f.read(M) == bytes(M)  # the gap after each block stayed a hole
