"""ArchiveWriter.batch(): the records of a batch leave in one write, byte for byte as if
written one by one."""

from __future__ import annotations

import tempfile

import pytest

from agent.archive.format import Compression
from agent.archive.output import Buf, SequentialOutput
from agent.archive.writer import ArchiveWriter
from tests.unit.archive_util import HEADER, read_archive, write_archive

K = 1024


class CountingOutput(SequentialOutput):
    """A real descriptor that counts the write calls made on it."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, "test")
        self.calls = 0

    def write(self, parts: list[Buf]) -> None:  # type: ignore[override]
        self.calls += 1
        super().write(parts)


def _records(w: ArchiveWriter) -> None:
    d = w.add_device("vda", 36 * K)
    w.write_data(d.id, 0, 4 * K, Compression.NONE, b"a" * 4 * K)
    w.write_zero(d.id, 4 * K, 28 * K)
    w.write_data(d.id, 32 * K, 4 * K, Compression.NONE, b"b" * 4 * K)


def test_a_batch_writes_the_same_bytes_in_one_call() -> None:
    plain = write_archive(_records)

    def batched(w: ArchiveWriter) -> None:
        d = w.add_device("vda", 36 * K)
        out = w.out
        assert isinstance(out, CountingOutput)
        before = out.calls
        with w.batch():
            w.write_data(d.id, 0, 4 * K, Compression.NONE, b"a" * 4 * K)
            w.write_zero(d.id, 4 * K, 28 * K)
            w.write_data(d.id, 32 * K, 4 * K, Compression.NONE, b"b" * 4 * K)
            assert out.calls == before  # nothing left yet
        assert out.calls == before + 1

    with tempfile.TemporaryFile() as f:
        w = ArchiveWriter(CountingOutput(f.fileno()), HEADER)
        batched(w)
        w.finish()
        f.seek(0)
        data = f.read()
    assert data == plain  # positions in the index included
    contents = read_archive(data)
    assert contents.data["vda"] == [(0, b"a" * 4 * K), (32 * K, b"b" * 4 * K)]


def test_a_failed_batch_writes_nothing_of_it() -> None:
    with tempfile.TemporaryFile() as f:
        w = ArchiveWriter(SequentialOutput(f.fileno(), "test"), HEADER)
        d = w.add_device("vda", 36 * K)
        size = w.out.position
        with pytest.raises(RuntimeError, match="boom"), w.batch():
            w.write_data(d.id, 0, 4 * K, Compression.NONE, b"a" * 4 * K)
            raise RuntimeError("boom")
        assert w.out.position == size
        assert f.seek(0, 2) == size


def test_batches_do_not_nest() -> None:
    with tempfile.TemporaryFile() as f:
        w = ArchiveWriter(SequentialOutput(f.fileno(), "test"), HEADER)
        with w.batch(), pytest.raises(RuntimeError, match="nest"), w.batch():
            pass
