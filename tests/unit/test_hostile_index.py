"""Hostile trailing indexes (issue 13): ``info`` and the seekable reader read an archive's
end in memory that does not grow with its index, and refuse every index that ``verify``
refuses, each with one clear message.

Each crafted archive below is valid except for its one defect: tests/unit/archive_util.py
recomputes frames, digests, the seal's chain and the footer around it.
"""

from __future__ import annotations

import gc
import io
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.archive.format import (
    FLAG_OPTIONAL,
    INDEX_ENTRY,
    Compression,
    End,
    Footer,
    RecordType,
)
from agent.archive.indexed import IndexedArchive, seal_of
from agent.archive.reader import ArchiveReader
from agent.archive.writer import ArchiveWriter
from agent.archive_info import archive_info
from agent.errors import ArchiveError
from agent.jobs.catalog import read_desc
from tests.unit.archive_util import (
    Parts,
    Rec,
    assemble,
    many_records,
    renumber,
    split,
    write_archive,
)


def _verify(data: bytes) -> None:
    r = ArchiveReader(io.BytesIO(data))
    for rec in r.records():
        if hasattr(rec, "data"):
            rec.data()


# --- memory ---------------------------------------------------------------------------


# Runs the command in this interpreter's child and reports the child's own high-water mark:
# VmHWM is per address space, so it starts afresh at exec (the wait4 ru_maxrss of a child
# started by a big test process includes that process's size at the fork).
_MEASURE = """
import sys
from agent.cli.main import main
code = main(sys.argv[1:])
sys.stdout.flush()
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
sys.stderr.write("VmHWM " + hwm.split()[1] + "\\n")
sys.exit(code)
"""


def _child_peak_kib(*args: str) -> tuple[int, bytes]:
    """Run ``backup-agent ARGS`` to the end; its peak resident set in KiB, and its output."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return int(done.stderr.decode().rsplit("VmHWM ", 1)[1]), done.stdout


@pytest.mark.slow
def test_info_of_a_large_index_stays_small(tmp_path: Path) -> None:
    """400,000 records (12.8 MB of index): info held every entry as an object before, about
    100 MiB more than for a tiny archive; now what it holds does not depend on the index."""
    big = tmp_path / "big.arc"
    big.write_bytes(many_records(400_000))
    tiny = Path(__file__).resolve().parent.parent / "data" / "tiny.arc"
    base, _ = _child_peak_kib("info", str(tiny))
    peak, out = _child_peak_kib("info", str(big))
    assert b"records" not in out and b"zero 1.5 GiB" in out  # it did read the archive
    assert peak - base < 8 * 1024, (base, peak)


@pytest.mark.slow
def test_opening_for_random_access_holds_no_entries(tmp_path: Path) -> None:
    path = tmp_path / "big.arc"
    path.write_bytes(many_records(200_000))
    gc.collect()
    tracemalloc.start()
    try:
        with IndexedArchive(str(path)) as arc:
            opened, _ = tracemalloc.get_traced_memory()
            assert arc.index is not None and arc.index.entries == 200_000
            # The first read builds the offset table: packed, 24 bytes an entry.
            assert arc.read("vda", 0, 4096) == bytes(4096)
            table, _ = tracemalloc.get_traced_memory()
            # record 1000, DATA, holds 1000 % 251 bytes, at the 1001st block from the end
            at = (200_000 - 1001) * 4096
            assert arc.read("vda", at, 4096) == bytes([1000 % 251]) * 4096
    finally:
        tracemalloc.stop()
    assert opened < 4 * 1024 * 1024
    assert table - opened < 200_000 * 24 + 1024 * 1024


def test_the_job_store_reads_only_header_and_seal(tmp_path: Path) -> None:
    path = tmp_path / "vm-20261126T020000Z-full.arc"
    path.write_bytes(many_records(100_000))
    gc.collect()
    tracemalloc.start()
    try:
        desc = read_desc(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert desc.complete
    assert peak < 512 * 1024
    cut = tmp_path / "cut.arc"
    cut.write_bytes(path.read_bytes()[:-1])
    assert not read_desc(str(cut)).complete


# --- indexes that verify refuses ------------------------------------------------------


def _small() -> bytes:
    """Two devices, DATA and ZERO records out of order, one config: an honest archive."""
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 4 * 4096)
        w.add_device("vdb", 8192)
        w.write_data(0, 8192, 4096, Compression.NONE, b"\x01" * 4096)
        w.write_zero(1, 0, 8192)
        w.write_zero(0, 0, 8192)
        w.write_data(0, 12288, 4096, Compression.NONE, b"\x02" * 4096)

    return write_archive(build)


def _with_index(edit: Callable[[bytearray], bytes]) -> bytes:
    """The small archive with its INDEX body edited, everything else re-sealed honestly."""
    parts = split(_small())
    i = parts.find(RecordType.INDEX)
    parts.records[i].body = edit(bytearray(parts.records[i].body))
    return assemble(renumber(parts.records), keep_index=True)


def _entry(body: bytearray, n: int) -> list[int]:
    return list(INDEX_ENTRY.unpack_from(body, n * INDEX_ENTRY.size))


def _set(body: bytearray, n: int, field: int, value: int) -> bytes:
    e = _entry(body, n)
    e[field] = value
    INDEX_ENTRY.pack_into(body, n * INDEX_ENTRY.size, *e)
    return bytes(body)


def _with_end(**changes: int) -> bytes:
    parts = split(_small())
    i = parts.find(RecordType.END)
    end = End.decode(parts.records[i].body)
    fields = {**end.__dict__, **changes}
    parts.records[i].body = End(**fields).encode()
    return assemble(renumber(parts.records), seal=False)


def _with_footer(**changes: int) -> bytes:
    data = _small()
    footer = Footer.decode(data[-48:], len(data) - 48)
    return data[:-48] + Footer(**{**footer.__dict__, **changes}).encode()


def _records(edit: Callable[[Parts], None], keep_index: bool = False) -> bytes:
    parts = split(_small())
    edit(parts)
    return assemble(renumber(parts.records), keep_index=keep_index)


def _unknown_required_record(p: Parts) -> None:
    p.records.insert(p.find(RecordType.END), Rec(0x0777, b"new"))


def _data_after_index(p: Parts) -> None:
    moved = p.records.pop(p.find(RecordType.DATA))
    p.records.insert(p.find(RecordType.END), moved)


def _bad_index_digest(p: Parts) -> None:
    p.records[p.find(RecordType.INDEX)].digest = bytes(16)


CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "one entry missing": (lambda: _with_index(lambda b: bytes(b[:-32])),
                          "its index and its seal count other"),
    "one entry twice": (lambda: _with_index(lambda b: bytes(b + b[-32:])),
                        "out of the order written"),
    "a partial entry": (lambda: _with_index(lambda b: bytes(b + b"\0" * 5)), "partial entry"),
    "a failing index digest": (lambda: _records(_bad_index_digest, keep_index=True),
                               "index record at byte .* fails its checksum"),
    "the seal's data total": (lambda: _with_end(data_bytes=4096),
                              "its seal covers another size than its devices"),
    "the seal's data and zero totals": (lambda: _with_end(data_bytes=4096, zero_bytes=20480),
                                        "its index and its seal count other data or zero"),
    "the seal's stored total": (lambda: _with_end(stored_bytes=4095),
                                "its index and its seal count other stored bytes"),
    "the seal's record count": (lambda: _with_end(records=3), "the seal says 3"),
    "the footer's archive length": (lambda: _with_footer(archive_len=10**6),
                                    "says the archive is 1000000 bytes long"),
    "the footer's index position": (lambda: _with_footer(index_pos=_small().index(b"BREC\x10")),
                                    "not an index record"),
    "a required record of a newer version": (lambda: _records(_unknown_required_record),
                                             "unknown to this backup-agent"),
    "data after the index": (lambda: _records(_data_after_index),
                             "data record at byte .* comes after the index"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_info_refuses_what_verify_refuses(tmp_path: Path, case: str) -> None:
    make, message = CASES[case]
    data = make()
    with pytest.raises(ArchiveError):
        _verify(data)
    path = tmp_path / "bad.arc"
    path.write_bytes(data)
    with pytest.raises(ArchiveError, match=message):
        archive_info(str(path))


def test_the_unchanged_archive_passes_both() -> None:
    data = _small()
    _verify(data)
    for make, _ in CASES.values():
        assert make() != data


# --- indexes that lie (verify only counts entries; info checks what it reads) ---------


LIES: dict[str, tuple[Callable[[], bytes], str]] = {
    "an undeclared device": (lambda: _with_index(lambda b: _set(b, 0, 3, 7)),
                             "names device 7, which was never declared"),
    "a range past the device": (lambda: _with_index(lambda b: _set(b, 0, 4, 2**63)),
                                "past its end"),
    "an unknown type": (lambda: _with_index(lambda b: _set(b, 0, 0, 0x33)),
                        "unknown record type 51"),
    "an unknown compression": (lambda: _with_index(lambda b: _set(b, 0, 1, 9)),
                               "unknown compression 9"),
    "a position inside another record": (lambda: _with_index(lambda b: _set(b, 1, 6,
                                                                            _entry(b, 0)[6] + 10)),
                                         "inside the record before it"),
    "a swapped pair": (lambda: _with_index(lambda b: bytes(b[32:64] + b[:32] + b[64:])),
                       "not where the data starts"),
    "the last entry names another record": (lambda: _with_index(lambda b: _set(b, 3, 4, 4096)),
                                            "its last data record is not the one its index"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_info_refuses_an_index_that_lies(tmp_path: Path, case: str) -> None:
    make, message = LIES[case]
    path = tmp_path / "lying.arc"
    path.write_bytes(make())
    with pytest.raises(ArchiveError, match=message), IndexedArchive(str(path)) as arc:
        arc.read("vda", 0, 4 * 4096)


def test_random_access_refuses_overlapping_ranges(tmp_path: Path) -> None:
    """An incremental whose index lists two ranges of one device that overlap (each inside
    the device, the totals right): the offset table shows it."""
    from agent.archive.format import Kind
    from tests.unit.archive_util import HEADER

    header = HEADER.__class__(**{**HEADER.__dict__, "kind": Kind.INCREMENTAL,
                                 "parent_uuid": HEADER.uuid})

    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 65536)
        w.write_zero(0, 0, 4096)
        w.write_zero(0, 8192, 4096)
        w.write_zero(0, 20480, 4096)

    parts = split(write_archive(build, header))
    i = parts.find(RecordType.INDEX)
    body = bytearray(parts.records[i].body)
    parts.records[i].body = _set(body, 1, 4, 2048)  # the middle one: the ends are read
    path = tmp_path / "inc.arc"
    path.write_bytes(assemble(renumber(parts.records), keep_index=True))
    # refused on opening (what `info` does), no longer only by the first read
    with pytest.raises(ArchiveError, match="overlapping"), IndexedArchive(str(path)) as arc:
        arc.read("vda", 0, 65536)


def test_an_archive_without_an_index_is_not_read_as_zeros(tmp_path: Path) -> None:
    parts = split(_small())
    del parts.records[parts.find(RecordType.INDEX)]
    path = tmp_path / "noindex.arc"
    path.write_bytes(assemble(renumber(parts.records)))
    _verify(path.read_bytes())
    assert archive_info(str(path)).end.records == 7
    with IndexedArchive(str(path)) as arc, pytest.raises(ArchiveError, match="no index"):
        arc.read("vda", 0, 4096)


def test_optional_records_among_the_index_are_skipped(tmp_path: Path) -> None:
    """A later minor version may add optional records anywhere after the header."""
    parts = split(_small())
    parts.records.insert(parts.find(RecordType.END), Rec(0x0777, b"later", FLAG_OPTIONAL))
    parts.records.insert(parts.find(RecordType.DATA, 1), Rec(0x0778, b"later", FLAG_OPTIONAL))
    data = assemble(renumber(parts.records))
    _verify(data)
    path = tmp_path / "newer.arc"
    path.write_bytes(data)
    with IndexedArchive(str(path)) as arc:
        assert arc.read("vda", 8192, 8192) == b"\x01" * 4096 + b"\x02" * 4096
    assert seal_of(str(path)).end.records == 10



# --- indexes that lie with the right counts: verify compares every entry ---------------


def _set_many(body: bytearray, *changes: tuple[int, int, int]) -> bytes:
    for n, field, value in changes:
        _set(body, n, field, value)
    return bytes(body)


#: Lies that the index walk on opening lets through (the counts, the totals per device,
#: the positions and the first and last records all check out): only a full read sees them.
INNER_LIES: dict[str, Callable[[], bytes]] = {
    "two inner entries' devices swapped": lambda: _with_index(
        lambda b: _set_many(b, (1, 3, 0), (2, 3, 1))),
    "the first entry's compression": lambda: _with_index(
        lambda b: _set(b, 0, 1, Compression.ZSTD)),
}


@pytest.mark.parametrize("case", [*INNER_LIES, *LIES])
def test_verify_refuses_an_index_that_lies_with_the_right_count(case: str) -> None:
    data = INNER_LIES[case]() if case in INNER_LIES else LIES[case][0]()
    entries = len(split(data).records[split(data).find(RecordType.INDEX)].body) // 32
    assert entries == 4  # as many as the archive has DATA and ZERO records
    with pytest.raises(ArchiveError, match=r"end record at byte \d+ does not seal the archive: "
                       r"its index lists 4 records, as many as it holds, but not these: an "
                       r"entry's type, compression, device, range or position is not its "
                       r"record's"):
        _verify(data)


@pytest.mark.parametrize("case", list(INNER_LIES))
def test_info_lets_these_lies_through(tmp_path: Path, case: str) -> None:
    """Why the full read must compare entries: opening checks only what it can cheaply."""
    path = tmp_path / "lying.arc"
    path.write_bytes(INNER_LIES[case]())
    assert archive_info(str(path)).end.records == 8  # HEADER, 2 DEVICE, 4 DATA/ZERO, INDEX


def test_verify_ignores_the_entries_reserved_field() -> None:
    _verify(_with_index(lambda b: _set(b, 1, 2, 0xBEEF)))  # readers ignore reserved fields


def test_verify_command_says_the_index_lies_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli.main import main

    path = tmp_path / "lying.arc"
    path.write_bytes(INNER_LIES["two inner entries' devices swapped"]())
    assert main(["verify", "--progress", "none", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("backup-agent: error: "), err
    assert "is not its record's" in err[0]


def test_comparing_the_index_holds_no_entries() -> None:
    """140,000 records: 4.5 MB of index, compared through two digests, not kept. What the
    read holds besides (its read-ahead, one INDEX record of 2 MiB and its masked copy)
    came to 5.4 MB; keeping the expected entries would add their 4.5 MB."""
    data = many_records(140_000)
    gc.collect()
    tracemalloc.start()
    try:
        reader = ArchiveReader(io.BytesIO(data))
        for _ in reader.records():
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.end is not None and reader.end.records > 140_000
    assert peak < 8 * 1024 * 1024, peak
