"""The writer's index spills to a temporary file: same bytes out, bounded memory."""

from __future__ import annotations

import gc
import random
import tempfile
import tracemalloc
from pathlib import Path

import pytest

from agent.archive.format import INDEX_ENTRIES_PER_RECORD, INDEX_ENTRY, Compression
from agent.archive.indexed import IndexedArchive
from agent.archive.output import SequentialOutput
from agent.archive.spill import SpillingBuffer
from agent.archive.writer import ArchiveWriter
from tests.unit.archive_util import HEADER

K = 1024


@pytest.mark.parametrize("spill_at", [1, 7, 100, 4096, 10**9])
@pytest.mark.parametrize("size", [1, 5, 64, 1000])
def test_chunks_give_back_every_byte_in_order(spill_at: int, size: int) -> None:
    rng = random.Random(spill_at * 31 + size)
    buf = SpillingBuffer(spill_at)
    want = bytearray()
    for _ in range(300):
        piece = rng.randbytes(rng.randrange(0, 40))
        buf.append(piece)
        want += piece
    assert len(buf) == len(want)
    got = [bytes(c) for c in buf.chunks(size)]
    buf.close()
    assert b"".join(got) == want
    assert all(len(c) == size for c in got[:-1]) and 0 < len(got[-1]) <= size


def _build(w: ArchiveWriter, records: int) -> None:
    dev = w.add_device("vda", records * 4096)  # every byte covered, as a full backup does
    for i in range(records):
        if i % 2:
            w.write_zero(dev.id, i * 4096, 4096)
        else:
            w.write_data(dev.id, i * 4096, 4096, Compression.NONE, bytes([i % 251]) * 4096)


def _write(path: Path, records: int, index_in_memory: int) -> None:
    with open(path, "wb") as f:
        w = ArchiveWriter(SequentialOutput(f.fileno(), "test"), HEADER,
                          index_in_memory=index_in_memory)
        _build(w, records)
        w.finish()


@pytest.mark.slow
def test_a_spilled_index_writes_the_same_archive(tmp_path: Path) -> None:
    # More entries than one INDEX record holds, spilled in odd-sized pieces.
    records = INDEX_ENTRIES_PER_RECORD + 1000
    _write(tmp_path / "mem.arc", records, index_in_memory=10**12)
    _write(tmp_path / "spilled.arc", records, index_in_memory=777 * INDEX_ENTRY.size + 5)
    assert (tmp_path / "mem.arc").read_bytes() == (tmp_path / "spilled.arc").read_bytes()
    with IndexedArchive(str(tmp_path / "spilled.arc")) as arc:  # the index is usable
        assert arc.read("vda", 6 * 4096, 4096) == bytes([6]) * 4096
        last = bytes([(records - 2) % 251]) * 4096 + bytes(4096)
        assert arc.read("vda", (records - 2) * 4096, 8192) == last


def _index_memory(index_in_memory: int) -> int:
    """Bytes the writer holds after 60,000 ZERO records (before it writes the index)."""
    with tempfile.TemporaryFile() as f:
        w = ArchiveWriter(SequentialOutput(f.fileno(), "test"), HEADER,
                          index_in_memory=index_in_memory)
        dev = w.add_device("vda", 2**40)
        gc.collect()
        tracemalloc.start()
        try:
            for i in range(60_000):
                w.write_zero(dev.id, i * 4096, 4096)
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        w.finish()
    return held


@pytest.mark.slow
def test_the_index_does_not_grow_in_memory() -> None:
    # 60,000 entries are 1.9 MB of index: all of it held without spilling (so this test
    # can tell), at most the 256 KiB threshold and small change with it.
    assert _index_memory(10**12) > 1_800_000
    assert _index_memory(256 * K) < 512 * K


def test_an_unwritable_tmpdir_keeps_the_index_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "does-not-exist"))
    _write(tmp_path / "a.arc", 5000, index_in_memory=4 * K)
    monkeypatch.undo()
    _write(tmp_path / "b.arc", 5000, index_in_memory=10**12)
    assert (tmp_path / "a.arc").read_bytes() == (tmp_path / "b.arc").read_bytes()
    assert "cannot spill the archive index" in caplog.text
