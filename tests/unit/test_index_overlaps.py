"""``info`` refuses an index whose ranges overlap (issue 13, d), in memory that does not grow
with the index: a FULL archive's ranges must tile its devices (a polynomial identity over
their boundaries, constant memory), other kinds' are sorted on disk (agent/archive/overlaps.py).
"""

from __future__ import annotations

import gc
import itertools
import random
import tracemalloc
from pathlib import Path

import pytest

from agent.archive import index_walk, overlaps
from agent.archive.format import INDEX_ENTRY, Device, Kind, RecordType
from agent.archive.overlaps import ExactCover, NoOverlap
from agent.archive_info import archive_info
from agent.errors import ArchiveError
from tests.hostile import builder as hb
from tests.unit.archive_util import assemble, renumber, split

T = RecordType


def _entries(ranges: list[tuple[int, int, int]]) -> memoryview:
    return memoryview(b"".join(INDEX_ENTRY.pack(T.ZERO & 0xFF, 0, 0, dev, off, ln, 0)
                               for dev, off, ln in ranges))


def _with_entry(data: bytes, n: int, offset: int) -> bytes:
    """``data`` with index entry ``n``'s device offset set to ``offset``, resealed."""
    parts = split(data)
    i = parts.find(T.INDEX)
    body = bytearray(parts.records[i].body)
    e = list(INDEX_ENTRY.unpack_from(body, n * INDEX_ENTRY.size))
    e[4] = offset
    INDEX_ENTRY.pack_into(body, n * INDEX_ENTRY.size, *e)
    parts.records[i].body = bytes(body)
    return assemble(renumber(parts.records), keep_index=True)


def _full() -> bytes:
    """A FULL archive of two devices, records out of order (ZERO, so the index is the only
    thing a lie has to change): vda 0..16384 in four, vdb 0..8192 in two."""
    recs = [hb.Record(T.ZERO, hb.zero(dev, off, ln)) for dev, off, ln in
            [(0, 8192, 4096), (1, 4096, 4096), (0, 0, 4096), (0, 4096, 4096),
             (1, 0, 4096), (0, 12288, 4096)]]
    return hb.seal([hb.Record(T.HEADER, hb.header()),
                    hb.Record(T.DEVICE, hb.device(0, 16384, "vda")),
                    hb.Record(T.DEVICE, hb.device(1, 8192, "vdb")), *recs])


def _open(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "a.arc"
    path.write_bytes(data)
    archive_info(str(path))


def test_info_refuses_overlaps_in_a_full_archive_whose_totals_add_up(tmp_path: Path) -> None:
    data = _full()
    _open(tmp_path, data)
    # Entry 3 (vda 4096..8192) moved onto entry 2 (vda 0..4096): vda's lengths still add
    # up to its size, every range is inside it, the first and last entries are right.
    bad = _with_entry(data, 3, 0)
    with pytest.raises(ArchiveError, match="ranges that overlap or leave gaps, though their "
                       "lengths add up to the devices' sizes: the index is damaged"):
        _open(tmp_path, bad)


def _incremental(count: int = 200) -> bytes:
    return hb.descending_ranges(count, length=512, gap=512)


def test_info_refuses_overlaps_in_an_incremental(tmp_path: Path) -> None:
    data = _incremental()
    _open(tmp_path, data)  # descending, with gaps: nothing to merge, nothing overlaps
    # entry 100 is at (200 - 1 - 100) * 1024; moved down by 768 it meets entry 101's range
    # (98 * 1024 .. + 512): the first and last entries, the lengths, the counts are right
    bad = _with_entry(data, 100, 98 * 1024 + 256)
    with pytest.raises(ArchiveError, match=r"device 'vda': the index lists overlapping ranges "
                       r"at device offset 100608: the index is damaged"):
        _open(tmp_path, bad)


@pytest.mark.parametrize("fan_in", [2, 3, 64])
def test_the_sort_on_disk_takes_many_runs_and_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fan_in: int) -> None:
    """Pieces of 4 entries: 50 runs, merged 2 or 3 at a time (several passes) or at once."""
    monkeypatch.setattr(index_walk, "PIECE", 4 * INDEX_ENTRY.size)
    monkeypatch.setattr(overlaps, "FAN_IN", fan_in)
    monkeypatch.setattr(overlaps, "BLOCK", 2 * 20)
    data = _incremental()
    _open(tmp_path, data)
    # inner entries (the first and last are checked against their records anyway), each
    # moved onto the range of the entry after it
    for n, off in ((1, 197 * 1024 + 1), (198, 1), (57, 141 * 1024 + 511)):
        with pytest.raises(ArchiveError, match="overlapping ranges"):
            _open(tmp_path, _with_entry(data, n, off))


def test_exact_cover_on_random_tilings() -> None:
    rng = random.Random(13)
    for _ in range(200):
        size = rng.randrange(1, 1 << 40)
        cuts = sorted({0, size, *(rng.randrange(size) for _ in range(rng.randrange(8)))})
        ranges = [(0, a, b - a) for a, b in itertools.pairwise(cuts)]
        rng.shuffle(ranges)
        good = ExactCover([Device(0, "d", size, {})])
        good.collect(_entries(ranges))
        assert good.finish(["d"]) is None
        # one range moved, inside the device: an overlap and a gap, the lengths' sum kept
        if len(ranges) >= 2:
            d, off, ln = ranges[0]
            right = size - off - ln
            moved = off + rng.randrange(1, right + 1) if right else off - rng.randrange(1, off + 1)
            bad = ExactCover([Device(0, "d", size, {})])
            bad.collect(_entries([(d, moved, ln), *ranges[1:]]))
            assert bad.finish(["d"]) is not None


def test_no_overlap_keeps_the_entries_on_disk() -> None:
    """600,000 ranges (12 MB of sort keys) checked in a few pieces' memory (5.9 MB at
    400,000: it does not grow with them)."""
    n = 600_000
    order = list(range(n))
    random.Random(5).shuffle(order)
    piece = 32768
    pieces = [_entries([(0, i * 2048, 1024) for i in order[k : k + piece]])
              for k in range(0, n, piece)]  # as the walk hands them out: 1 MiB each
    check = NoOverlap()
    gc.collect()
    tracemalloc.start()
    try:
        for p in pieces:
            check.collect(p)
        problem = check.finish(["vda"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert problem is None
    assert peak < 8 * 1024 * 1024, peak


def test_info_of_an_incremental_without_index_is_unchanged(tmp_path: Path) -> None:
    parts = split(_incremental(10))
    del parts.records[parts.find(T.INDEX)]
    path = tmp_path / "a.arc"
    path.write_bytes(assemble(renumber(parts.records)))
    assert archive_info(str(path)).header.kind == Kind.INCREMENTAL
