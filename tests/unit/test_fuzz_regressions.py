"""What the fuzzer (tests/fuzz/, docs/FUZZING.md) and the hostile-archive builder
(tests/hostile/builder.py) found, each cut down to the smallest archive that shows it.

A test marked ``xfail(strict=True)`` is a bug still open: it fails today, and turns red
(XPASS) once the bug is fixed, as a reminder to drop the mark and to set the matching
``KNOWN_*`` flag in tests/fuzz/target.py to False, so that the fuzzer reports it again
should it come back.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from agent.archive import codec
from agent.archive.format import INDEX_ENTRY, Compression, Footer, RecordType
from agent.archive.indexed import IndexedArchive
from agent.archive.reader import ArchiveReader
from agent.errors import ArchiveError
from tests.fuzz.seeds import FULL, SEEDS
from tests.hostile import builder as hb
from tests.unit.archive_util import assemble, read_archive, renumber, split

T = RecordType


def _entries(data: bytes) -> list[tuple[int, ...]]:
    parts = split(data)
    body = parts.records[parts.find(T.INDEX)].body
    return [INDEX_ENTRY.unpack_from(body, k) for k in range(0, len(body), INDEX_ENTRY.size)]


def _with_index(data: bytes, entries: list[tuple[int, ...]]) -> bytes:
    """``data`` with its INDEX record replaced by ``entries``, everything else resealed:
    the count is right, so only a reader that compares each entry with its record refuses
    it (the sequential reader, since it does: ``verify``)."""
    parts = split(data)
    i = parts.find(T.INDEX)
    parts.records[i].body = b"".join(INDEX_ENTRY.pack(*e) for e in entries)
    return assemble(renumber(parts.records), keep_index=True)


def _open(path: Path, data: bytes) -> IndexedArchive:
    path.write_bytes(data)
    return IndexedArchive(str(path))


@pytest.mark.parametrize("padding", [1, 16, 47])
def test_info_reads_an_archive_with_short_tape_padding(tmp_path: Path, padding: int) -> None:
    data = FULL + bytes(padding)
    read_archive(data)  # valid: verify and restore read it
    with _open(tmp_path / "a.arc", data) as arc:
        assert arc.archive_len == len(FULL)


@pytest.mark.parametrize("pos", [2**63, 2**63 - 8])
def test_info_refuses_a_footer_past_2_63_as_damage(tmp_path: Path, pos: int) -> None:
    data = FULL[:-48] + Footer(pos, pos, len(FULL)).encode()  # its own digest is right
    with pytest.raises(ArchiveError):
        _open(tmp_path / "a.arc", data)


def test_random_access_refuses_an_index_entry_past_2_63(tmp_path: Path) -> None:
    entries = _entries(FULL)
    first = min(range(len(entries)), key=lambda k: entries[k][6])  # that one is checked
    last = max(k for k, e in enumerate(entries) if e[0] == T.DATA & 0xFF and k != first)
    entries[last] = (*entries[last][:6], 2**63)
    data = _with_index(FULL, entries)
    with pytest.raises(ArchiveError, match="not its record's"):  # verify compares entries
        read_archive(data)
    # refused at the latest by read(); since the index is walked on opening, already there
    with pytest.raises(ArchiveError), _open(tmp_path / "a.arc", data) as arc:
        e = entries[last]
        arc.read("vda" if e[3] == 0 else "vdb", e[4], e[5])


def test_random_access_without_an_index_does_not_invent_zeros(tmp_path: Path) -> None:
    data = SEEDS["no-index"]
    want = read_archive(data)
    with _open(tmp_path / "a.arc", data) as arc:
        try:
            got = arc.read("disk-0.raw", 0, 1024)
        except ArchiveError:
            return  # refusing is right too: it cannot find the bytes without scanning
        assert got == want.image("disk-0.raw")


def test_random_access_checks_a_zero_entry_against_its_record(tmp_path: Path) -> None:
    entries = _entries(FULL)
    first = min(range(len(entries)), key=lambda k: entries[k][6])  # that one is checked
    k = next(k for k, e in enumerate(entries) if e[0] == T.DATA & 0xFF and k != first)
    entries[k] = (T.ZERO & 0xFF, 0, *entries[k][2:])
    data = _with_index(FULL, entries)
    with pytest.raises(ArchiveError, match="not its record's"):  # verify compares entries
        read_archive(data)
    want = read_archive(FULL)  # the same records: only the index differs
    dev = "vda" if entries[k][3] == 0 else "vdb"
    off, length = entries[k][4], entries[k][5]
    try:
        with _open(tmp_path / "a.arc", data) as arc:  # the index is checked on opening
            got = arc.read(dev, off, length)
    except ArchiveError:
        return
    assert got == want.image(dev)[off : off + length]


def test_config_keeps_only_the_config_asked_for() -> None:
    chunk = 32 << 20
    arc = hb.seal([hb.Record(hb.T.HEADER, hb.header()),
                   hb.Record(hb.T.CONFIG, hb.config(0, 4 * chunk, "bomb.xml")),
                   *[hb.Record(hb.T.CONFIG_DATA, hb.config_data(
                       0, i * chunk, hb.zstd_zeros(chunk), length=chunk, compression=1))
                     for i in range(4)],
                   hb.Record(hb.T.CONFIG, hb.config(1, 3, "vm.conf")),
                   hb.Record(hb.T.CONFIG_DATA, hb.config_data(1, 0, b"abc"))])
    assert len(arc) < 16 * 1024
    tracemalloc.start()
    try:
        reader = ArchiveReader(io.BytesIO(arc), verify_data=False)
        assert reader.config("vm.conf") == b"abc"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # One chunk decompressed at a time (32 MiB) and its record: not the 128 MiB config.
    assert peak < 80 << 20, f"peak {peak >> 20} MiB"
    # The large one was checked and dropped: asking for it says how to read it instead.
    with pytest.raises(ArchiveError, match=r"config 'bomb.xml' \(134217728 bytes\) was not "
                       r"kept in memory: .*`backup-agent config` writes any config out"):
        reader.config("bomb.xml")


def test_config_of_any_size_streams_through_the_callback() -> None:
    arc = hb.config_bomb(2, chunk=1 << 20)
    seen: list[tuple[str, int]] = []
    reader = ArchiveReader(io.BytesIO(arc), keep_configs=False,
                           on_config_data=lambda cfg, data: seen.append((cfg.name, len(data))))
    assert seen == [("bomb.xml", 1 << 20)] * 2
    assert reader.config_info("bomb.xml").size == 2 << 20
    with pytest.raises(ArchiveError, match=r"not kept in memory: configs are not kept"):
        reader.config("bomb.xml")


@pytest.mark.parametrize("after", [b"garbage!", b"second frame"])
def test_decompress_refuses_bytes_after_the_frame_either_way(after: bytes) -> None:
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"a" * 4096)
    payload = frame + (frame if after == b"second frame" else after)
    outcomes = []
    for out in (None, bytearray(4096)):
        try:
            outcomes.append(len(codec.decompress(Compression.ZSTD, payload, 4096, "x", out)))
        except ArchiveError:
            outcomes.append(-1)
    assert outcomes == [-1, -1]  # "one zstd frame" (docs/FORMAT.md, DATA)


def test_decompress_agrees_with_itself_on_a_frame_it_refuses() -> None:
    payload = bytes.fromhex("28b52ffd2044c4000088637075733d320a6d656d6f72793d31470a010041e75c02")
    outcomes = []
    for out in (None, bytearray(68)):
        try:
            outcomes.append(len(codec.decompress(Compression.ZSTD, payload, 68, "x", out)))
        except ArchiveError:
            outcomes.append(-1)
    assert outcomes == [-1, -1], outcomes  # its last block is missing: the frame is cut short


def test_decompress_bounds_the_blocks_it_walks() -> None:
    """A frame of empty blocks (3 bytes each) is refused for its block count, before a walk
    over millions of them (3.6 s per 32 MiB record in Python)."""
    head = b"\x28\xb5\x2f\xfd\x20\x44"  # single segment, 68 bytes
    rle = (1 | 1 << 1 | 68 << 3).to_bytes(3, "little") + b"x"  # last, RLE: 68 x "x"
    good = head + rle
    assert bytes(codec.decompress(Compression.ZSTD, good, 68, "x")) == b"x" * 68
    empty = (0).to_bytes(3, "little")  # not last, raw, 0 bytes
    for out in (None, bytearray(68)):
        assert bytes(codec.decompress(Compression.ZSTD, head + empty * 8 + rle, 68, "x",
                                      out)) == b"x" * 68
        with pytest.raises(ArchiveError, match="more blocks than 68 bytes need"):
            codec.decompress(Compression.ZSTD, head + empty * 100_000 + rle, 68, "x", out)


def test_the_reproducers_are_what_they_claim() -> None:
    """The archives above are built from FULL, a valid archive with an index and at least
    two DATA records (guards the tests against testing the wrong thing)."""
    entries = _entries(FULL)
    assert [e[0] for e in entries].count(T.DATA & 0xFF) >= 2
    assert struct.unpack_from("<Q", FULL, len(FULL) - 40)[0] != 2**64 - 1  # FULL has an index
