"""Random access through the trailing index (agent/archive/indexed.py)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from agent.archive.codec import CompressionSpec, compress
from agent.archive.format import Compression
from agent.archive.indexed import IndexedArchive
from agent.archive.writer import ArchiveWriter
from agent.errors import ArchiveError
from tests.unit.archive_util import write_archive

SIZE = 1024 * 1024 + 777  # not a multiple of anything


def _image() -> bytes:
    rng = random.Random(7)
    img = bytearray(SIZE)
    for off in range(0, SIZE, 65536):
        if rng.random() < 0.6:
            n = min(65536, SIZE - off)
            img[off : off + n] = rng.randbytes(n) if rng.random() < 0.5 else bytes([off % 251]) * n
    return bytes(img)


def _archive(img: bytes) -> bytes:
    """Records of one device in shuffled order, zero ranges as ZERO records."""
    pieces = [(off, min(65536, SIZE - off)) for off in range(0, SIZE, 65536)]
    random.Random(3).shuffle(pieces)

    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", SIZE)
        w.add_device("vdb", 4096)
        w.write_zero(1, 0, 4096)
        for off, n in pieces:
            chunk = img[off : off + n]
            if chunk.count(0) == n:
                w.write_zero(0, off, n)
            else:
                comp, payload = compress(chunk, CompressionSpec())
                w.write_data(0, off, n, comp, payload)

    return write_archive(build)


@pytest.fixture(scope="module")
def img() -> bytes:
    return _image()


def test_reads_any_range_without_scanning(tmp_path: Path, img: bytes) -> None:
    path = tmp_path / "a.arc"
    path.write_bytes(_archive(img))
    rng = random.Random(11)
    with IndexedArchive(str(path)) as arc:
        assert [d.name for d in arc.devices] == ["vda", "vdb"]
        assert arc.read("vda", 0, SIZE) == img
        for _ in range(200):
            off = rng.randrange(SIZE)
            n = rng.randrange(SIZE - off + 1)
            assert arc.read("vda", off, n) == img[off : off + n]
        assert arc.read("vdb", 0, 4096) == bytes(4096)
        assert arc.end.data_bytes + arc.end.zero_bytes == SIZE + 4096


def test_footer_found_behind_tape_padding(tmp_path: Path, img: bytes) -> None:
    path = tmp_path / "padded.arc"
    raw = _archive(img)
    block = 256 * 1024
    path.write_bytes(raw + bytes(block - len(raw) % block))  # dd conv=sync
    with IndexedArchive(str(path)) as arc:
        assert arc.read("vda", 100_000, 5000) == img[100_000:105_000]


def test_truncated_file_has_no_footer(tmp_path: Path, img: bytes) -> None:
    path = tmp_path / "cut.arc"
    path.write_bytes(_archive(img)[:-10])
    with pytest.raises(ArchiveError, match="footer"):
        IndexedArchive(str(path))


def test_range_outside_device_is_refused(tmp_path: Path, img: bytes) -> None:
    path = tmp_path / "a.arc"
    path.write_bytes(_archive(img))
    with IndexedArchive(str(path)) as arc, pytest.raises(ArchiveError, match="outside"):
        arc.read("vda", SIZE - 10, 11)


def test_uncompressed_records(tmp_path: Path) -> None:
    data = os.urandom(8192)

    def build(w: ArchiveWriter) -> None:
        w.add_device("d", 8192)
        w.write_data(0, 4096, 4096, Compression.NONE, data[4096:])
        w.write_data(0, 0, 4096, Compression.NONE, data[:4096])

    path = tmp_path / "n.arc"
    path.write_bytes(write_archive(build))
    with IndexedArchive(str(path)) as arc:
        assert arc.read("d", 1000, 6000) == data[1000:7000]


def _same_devices(order_seed: int, extra_zero_records: int) -> bytes:
    """An archive of the same two devices as _archive(), records in another order, and
    longer (extra zero records split the small device) when asked."""
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", SIZE)
        w.add_device("vdb", 4096)
        pieces = [(off, min(65536, SIZE - off)) for off in range(0, SIZE, 65536)]
        random.Random(order_seed).shuffle(pieces)
        for off, n in pieces:
            w.write_zero(0, off, n)
        step = 4096 // (extra_zero_records + 1)
        for i in range(extra_zero_records + 1):
            start = i * step
            end = 4096 if i == extra_zero_records else start + step
            w.write_zero(1, start, end - start)

    return write_archive(build)


@pytest.mark.parametrize("same_size", [False, True])
def test_an_older_archive_left_behind_is_not_mixed_in(tmp_path: Path, img: bytes,
                                                      same_size: bool) -> None:
    """A file overwritten in place by a shorter archive (a reused tape image): the start is
    the new archive, the end the old one. IndexedArchive must refuse the mix, also when
    both archives have the same devices (the seal's sizes then agree)."""
    old = _archive(img) if not same_size else _same_devices(5, extra_zero_records=40)
    new = _same_devices(9, extra_zero_records=0)
    assert len(old) > len(new) + 1024
    path = tmp_path / "tape"
    pad = -len(new) % 4096
    path.write_bytes(new + bytes(pad) + old[len(new) + pad:])
    with pytest.raises(ArchiveError, match="does not belong to the archive at its start"):
        IndexedArchive(str(path))
    path.write_bytes(new + bytes(pad))  # the same archive alone, padded: fine
    with IndexedArchive(str(path)) as arc:
        assert arc.read("vdb", 0, 4096) == bytes(4096)
