"""FileTarget's writeback windows: which written ranges are written back and settled,
and when."""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import threading
from pathlib import Path

import pytest

import agent.targets.file as target_mod
from agent.errors import TargetError
from agent.targets.file import FileTarget, WritebackWindows, coalesce

M = 1024 * 1024


def test_coalesce_sorts_and_merges_touching_and_overlapping_ranges() -> None:
    assert coalesce([]) == []
    assert coalesce([(4 * M, M), (0, M), (M, M), (10 * M, M), (1536 * 1024, M)]) == [
        (0, 2560 * 1024), (4 * M, M), (10 * M, M)]
    assert coalesce([(0, 8 * M), (M, M)]) == [(0, 8 * M)]  # contained


def test_a_window_starts_when_it_fills_and_settles_when_the_next_does() -> None:
    w = WritebackWindows(window=4 * M)
    assert w.add(0, 2 * M) == ([], [])
    # The first window fills: its writeback starts; nothing before it to settle.
    assert w.add(2 * M, 2 * M) == ([(0, 4 * M)], [])
    assert w.add(6 * M, 2 * M) == ([], [])
    # The second fills: it starts, and the first is due, merged into one range.
    assert w.add(4 * M, 2 * M) == ([(4 * M, 4 * M)], [(0, 4 * M)])
    # One write may fill a window.
    assert w.add(9 * M, 8 * M) == ([(9 * M, 8 * M)], [(4 * M, 4 * M)])


def test_every_write_is_started_and_due_exactly_once_across_threads() -> None:
    w = WritebackWindows(window=3 * M)
    started: list[tuple[int, int]] = []
    due: list[tuple[int, int]] = []
    lock = threading.Lock()

    def writer(first: int) -> None:
        for i in range(first, 400, 4):
            begin, settle = w.add(i * M, M)
            with lock:
                started.extend(begin)
                due.extend(settle)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 400 writes fill 133 windows of three (the last write is left in the one being
    # filled): all 133 started, all but the last due, and no byte twice in either.
    for ranges, windows in ((started, 133), (due, 132)):
        covered = sorted(ranges)
        assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(covered))
        assert sum(n for _, n in ranges) == windows * 3 * M
    assert set(due) <= set(started)


def test_writeback_starts_once_per_window_not_per_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = target_mod._sync_file_range
    calls: list[tuple[int, int, int]] = []

    def counting(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append((offset, length, flags))
        return int(real(fd, offset, length, flags))

    monkeypatch.setattr(target_mod, "_sync_file_range", counting)
    t = FileTarget(str(tmp_path / "d.raw"), 16 * M, fresh=True)
    t._writeback = WritebackWindows(window=4 * M)
    try:
        for off in range(0, 16 * M, 64 * 1024):  # 256 writes of 64 KiB
            t.write(off, bytes(64 * 1024))
    finally:
        t.close()
    write = target_mod._SYNC_FILE_RANGE_WRITE
    assert [(o, n) for o, n, f in calls if f == write] == [(i * 4 * M, 4 * M) for i in range(4)]
    assert [(o, n) for o, n, f in calls if f != write] == [(i * 4 * M, 4 * M) for i in range(3)]


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


def _failing_settle(err: int) -> object:
    """A sync_file_range whose waiting calls fail with ``err``, as the kernel reports a
    writeback error (EIO) or an unsupported file system (EINVAL)."""
    real = target_mod._sync_file_range

    def fake(fd: int, offset: int, length: int, flags: int) -> int:
        if flags & 4:  # SYNC_FILE_RANGE_WAIT_AFTER: a settle
            ctypes.set_errno(err)
            return -1
        return int(real(fd, offset, length, flags))

    return fake


def test_a_writeback_error_fails_the_write(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(target_mod, "_sync_file_range", _failing_settle(errno.EIO))
    t = FileTarget(str(tmp_path / "d.raw"), 16 * M, fresh=True, label="D (device 'd')")
    t._writeback = WritebackWindows(window=2 * M)
    try:
        t.write(0, bytes(2 * M))  # fills the first window
        # The second fills the next, which settles the first: its error is the write's.
        with pytest.raises(TargetError, match=r"^D \(device 'd'\): writing back offset 0 "
                                              r"failed: Input/output error$"):
            t.write(2 * M, bytes(2 * M))
    finally:
        t.close()


def test_a_file_system_without_sync_file_range_still_restores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(target_mod, "_sync_file_range", _failing_settle(errno.EINVAL))
    path = tmp_path / "d.raw"
    t = FileTarget(str(path), 8 * M, fresh=True)
    t._writeback = WritebackWindows(window=2 * M)
    data = os.urandom(8 * M)
    try:
        for off in range(0, 8 * M, M):
            t.write(off, data[off:off + M])
        t.flush()
    finally:
        t.close()
    assert path.read_bytes() == data
