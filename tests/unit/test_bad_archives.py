"""Damaged, truncated, forged and unsupported archives: every one must be refused with an
ArchiveError (UnsupportedArchive for what a newer version could read) whose message says
what is wrong and where.

Malformed archives are built by taking a good one apart into records and framing them
again (tests/unit/archive_util.py), so that frame CRCs, digests, the END seal and the
footer are right and only the defect under test is left for the reader to find.
"""

from __future__ import annotations

import io
import random
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import replace

import pytest
import zstandard

from agent.archive import codec
from agent.archive.codec import CompressionSpec
from agent.archive.format import (
    CHUNK_FIXED,
    FLAG_OPTIONAL,
    FRAME,
    INDEX_ENTRY,
    MAGIC,
    MAX_BODY,
    MAX_DATA_LENGTH,
    Chunk,
    Compression,
    Config,
    Device,
    End,
    Footer,
    Header,
    Kind,
    RecordType,
    Zero,
    pack_preamble,
)
from agent.archive.reader import ArchiveReader, DataRecord
from agent.archive.writer import ArchiveWriter
from agent.errors import ArchiveError, UnsupportedArchive
from tests.unit.archive_util import (
    HEADER,
    Rec,
    assemble,
    flip,
    read_archive,
    reframe,
    renumber,
    split,
    write_archive,
)

NONE = CompressionSpec.parse("none")
A = bytes(range(256)) * 16
B = b"B" * 4096
C = random.Random(1).randbytes(4096)
CONFIG = b"cpus=2\nmemory=1G\n"


def _small(w: ArchiveWriter) -> None:
    vda = w.add_device("vda", 16384)
    vdb = w.add_device("vdb", 4096, {"format": "raw"})
    w.add_config("vm.conf", CONFIG, NONE)
    w.write_data(vda.id, 0, 4096, Compression.NONE, A)
    comp, payload = codec.compress(B, CompressionSpec())
    assert comp == Compression.ZSTD
    w.write_data(vda.id, 4096, 4096, comp, payload)
    w.write_data(vdb.id, 0, 4096, Compression.NONE, C)
    w.write_zero(vda.id, 8192, 8192)


#: 0 HEADER, 1 DEVICE vda, 2 DEVICE vdb, 3 CONFIG, 4 CONFIG_DATA, 5 DATA vda@0,
#: 6 DATA vda@4096 (zstd), 7 DATA vdb@0, 8 ZERO vda@8192, 9 INDEX, 10 END, footer
SMALL = write_archive(_small)
P = split(SMALL)
ORIGINAL = read_archive(SMALL)
FOOTER_POS = len(SMALL) - 48
HDR, VDA, VDB, CFG, CFG_DATA, DATA0, DATA1, DATA_VDB, ZERO, INDEX, END = range(11)


def pos(i: int) -> int:
    """Byte position of record ``i`` of SMALL."""
    return P.records[i].pos


def body_pos(i: int) -> int:
    return pos(i) + FRAME.size


def recs() -> list[Rec]:
    """A fresh copy of SMALL's records, to change."""
    return [replace(r) for r in P.records]


def with_body(i: int, body: bytes, records: list[Rec] | None = None) -> list[Rec]:
    out = recs() if records is None else records
    out[i] = replace(out[i], body=body, digest=None)
    return out


def fails(data: bytes, *fragments: str, exc: type[ArchiveError] = ArchiveError) -> str:
    """Read ``data`` to the end; it must raise ``exc`` with every fragment in the message."""
    with pytest.raises(exc) as e:
        read_archive(data)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, f"expected {f!r} in the message: {msg!r}"
    return msg


def test_the_base_archive_is_good() -> None:
    assert [r.rtype for r in P.records] == [
        RecordType.HEADER, RecordType.DEVICE, RecordType.DEVICE, RecordType.CONFIG,
        RecordType.CONFIG_DATA, RecordType.DATA, RecordType.DATA, RecordType.DATA,
        RecordType.ZERO, RecordType.INDEX, RecordType.END,
    ]
    assert ORIGINAL.image("vda") == A + B + bytes(8192)
    assert ORIGINAL.image("vdb") == C
    assert ORIGINAL.configs == {"vm.conf": CONFIG}
    # Re-framing changes nothing by itself: the helpers are faithful.
    assert assemble(P.records) == SMALL
    assert assemble(renumber(P.records)) == SMALL


# --- not an archive at all ------------------------------------------------------------


def test_empty_input() -> None:
    fails(b"", "the archive is empty")


def test_random_bytes() -> None:
    fails(random.Random(0).randbytes(10000), "not a backup-agent archive", "bad magic at byte 0")


def test_text_file() -> None:
    fails(b"#!/bin/sh\necho this is not an archive\n", "not a backup-agent archive")


def test_random_bytes_after_a_good_preamble() -> None:
    fails(pack_preamble() + b"x" * 100, "no record at byte 16: bad record magic")


def test_archive_not_starting_with_a_header() -> None:
    fails(assemble(renumber(recs()[1:])), "does not start with a header record")


# --- truncation -----------------------------------------------------------------------


TRUNCATIONS: dict[str, tuple[int, str]] = {
    "inside the preamble": (9, "the archive is truncated: only 9 bytes"),
    "right after the preamble": (16, "the archive ends at byte 16: it is incomplete"),
    "inside a frame header": (
        pos(VDB) + 10, f"truncated at byte {pos(VDB) + 10} (inside a record header)"
    ),
    "inside the header body": (40 + 30, "truncated at byte 70 (inside record 0)"),
    "inside a metadata body": (body_pos(CFG) + 3, f"truncated at byte {body_pos(CFG) + 3} "
                               "(inside record 3)"),
    "between metadata records": (pos(CFG), f"the archive ends at byte {pos(CFG)}: it is "
                                 "incomplete"),
    "inside a data body": (body_pos(DATA0) + 1000, f"truncated at byte "
                           f"{body_pos(DATA0) + 1000} (inside record 5)"),
    "inside a digest": (pos(DATA1) - 7, f"truncated at byte {pos(DATA1) - 7} "
                        "(inside record 5)"),
    "between data records": (pos(DATA1), f"the archive ends at byte {pos(DATA1)} without "
                             "its end record: it is incomplete"),
    "before the index": (pos(INDEX), f"ends at byte {pos(INDEX)} without its end record"),
    "before END": (pos(END), f"the archive ends at byte {pos(END)} without its end record"),
    "inside END": (pos(END) + 50, f"truncated at byte {pos(END) + 50} (inside record 10)"),
    "before the footer": (FOOTER_POS, f"truncated inside its footer at byte {FOOTER_POS}"),
    "inside the footer": (FOOTER_POS + 47, f"truncated inside its footer at byte {FOOTER_POS}"),
}


@pytest.mark.parametrize("case", list(TRUNCATIONS))
def test_truncated(case: str) -> None:
    length, message = TRUNCATIONS[case]
    fails(SMALL[:length], message)


def _every_truncation_fails(data: bytes) -> None:
    for n in range(len(data)):
        try:
            read_archive(data[:n])
        except ArchiveError as e:
            msg = str(e)
            assert any(w in msg for w in ("truncated", "incomplete", "empty")), (n, msg)
        else:
            pytest.fail(f"an archive cut to {n} of {len(data)} bytes was accepted")


@pytest.mark.slow
def test_truncation_at_every_byte_offset_fails() -> None:
    _every_truncation_fails(SMALL)


@pytest.mark.slow
def test_truncation_of_an_archive_with_many_small_records() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 64 * 16)
        w.add_config("a", b"x", NONE)
        w.add_config("b", b"", NONE)
        for i in range(64):
            if i % 3:
                w.write_data(0, i * 16, 16, Compression.NONE, bytes([i]) * 16)
            else:
                w.write_zero(0, i * 16, 16)

    _every_truncation_fails(write_archive(build))


# --- damage: flipped bits -------------------------------------------------------------


def test_flipped_bit_in_a_data_payload() -> None:
    fails(flip(SMALL, body_pos(DATA0) + CHUNK_FIXED + 100),
          f"device 'vda': data record at byte {pos(DATA0)} (device offset 0) fails its "
          "checksum")


def test_flipped_bit_in_a_compressed_payload() -> None:
    fails(flip(SMALL, body_pos(DATA1) + CHUNK_FIXED + 5, 0x40),
          f"data record at byte {pos(DATA1)}", "fails its checksum")


def test_flipped_bit_in_a_data_record_offset_field() -> None:
    # The offset now points elsewhere: the digest is checked before the claim is believed.
    fails(flip(SMALL, body_pos(DATA1) + 9, 0x80),
          f"data record at byte {pos(DATA1)} fails its checksum")


@pytest.mark.parametrize("offset", range(FRAME.size))
def test_flipped_bit_in_a_frame_header(offset: int) -> None:
    msg = fails(flip(SMALL, pos(DATA1) + offset, 0x10), f"at byte {pos(DATA1)}")
    if offset < 4:
        assert "bad record magic" in msg
    else:
        assert "damaged (CRC mismatch)" in msg


def test_flipped_bit_in_the_header_record() -> None:
    fails(flip(SMALL, body_pos(HDR) + 3), "header record at byte 16 fails its checksum")


def test_flipped_bit_in_a_device_record() -> None:
    fails(flip(SMALL, body_pos(VDB) + 4), f"device record at byte {pos(VDB)} fails its checksum")


def test_flipped_bit_in_a_config_data_record() -> None:
    fails(flip(SMALL, pos(DATA0) - 20),
          f"config data record at byte {pos(CFG_DATA)} fails its checksum")


def test_flipped_bit_in_a_zero_record() -> None:
    fails(flip(SMALL, body_pos(ZERO) + 17), f"zero record at byte {pos(ZERO)} fails its checksum")


def test_flipped_bit_in_the_index() -> None:
    fails(flip(SMALL, body_pos(INDEX) + 8), f"index record at byte {pos(INDEX)} fails its checksum")


def test_flipped_bit_in_the_end_record() -> None:
    fails(flip(SMALL, body_pos(END) + 1), f"end record at byte {pos(END)} fails its checksum")
    fails(flip(SMALL, body_pos(END) + 60), f"end record at byte {pos(END)} fails its checksum")
    fails(flip(SMALL, FOOTER_POS - 1), f"end record at byte {pos(END)} fails its checksum")


def test_flipped_bit_in_the_footer() -> None:
    fails(flip(SMALL, FOOTER_POS + 2), f"bad footer magic at byte {FOOTER_POS}")
    fails(flip(SMALL, FOOTER_POS + 9),
          f"the footer at byte {FOOTER_POS} is damaged (digest mismatch)")
    fails(flip(SMALL, len(SMALL) - 1),
          f"the footer at byte {FOOTER_POS} is damaged (digest mismatch)")


def test_flipped_bit_in_the_preamble() -> None:
    fails(flip(SMALL, 3), "not a backup-agent archive (bad magic at byte 0)")
    fails(flip(SMALL, 12), "archive preamble has unknown flags 0x1", exc=UnsupportedArchive)


@pytest.mark.slow
def test_any_single_bit_flip_is_caught() -> None:
    for i in range(len(SMALL)):
        with pytest.raises(ArchiveError):
            read_archive(flip(SMALL, i, 1 << (i % 8)))


def test_a_flipped_minor_version_breaks_the_seal() -> None:
    # Readers accept any minor version, so only the chain, which starts with the
    # preamble, notices a flipped bit there.
    fails(flip(SMALL, 10, 0x04), f"end record at byte {pos(END)} does not seal the archive: "
                                 "the chained digest does not match")


def test_verify_data_false_leaves_the_payload_digest_to_the_consumer() -> None:
    bad = flip(SMALL, body_pos(DATA_VDB) + CHUNK_FIXED)
    r = ArchiveReader(io.BytesIO(bad), verify_data=False)
    data = [rec for rec in r.records() if isinstance(rec, DataRecord)]
    assert r.end is not None  # the seal covers digests, not the payload itself
    data[0].check()
    with pytest.raises(ArchiveError, match=f"device 'vdb': data record at byte {pos(DATA_VDB)} "
                                           r"\(device offset 0\) fails its checksum"):
        data[2].check()


# --- forgery of a single record -------------------------------------------------------


def test_forged_record_with_a_matching_digest_is_caught_by_the_seal() -> None:
    forged = with_body(DATA0, Chunk(0, Compression.NONE, 0, 4096).encode() + b"X" * 4096)
    bad = assemble(forged, seal=False)
    # The forged record itself looks fine and is handed out; the seal refuses the whole.
    r = ArchiveReader(io.BytesIO(bad))
    seen: list[bytes] = []
    with pytest.raises(ArchiveError) as e:
        for rec in r.records():
            if isinstance(rec, DataRecord):
                seen.append(bytes(rec.data()))
    assert b"X" * 4096 in seen
    assert str(e.value) == (f"end record at byte {pos(END)} does not seal the archive: "
                            "the chained digest does not match")


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("records", 11, "10 records present, the seal says 11"),
        ("data_bytes", 3 * 4096 + 1, "data totals do not match"),
        ("zero_bytes", 0, "data totals do not match"),
        ("stored_bytes", 3 * 4096, "data totals do not match"),
        ("devices", 3, "device or config counts do not match"),
        ("configs", 0, "device or config counts do not match"),
        ("chain", bytes(32), "the chained digest does not match"),
    ],
)
def test_end_record_that_does_not_seal(field: str, value: int | bytes, problem: str) -> None:
    end = replace(End.decode(P.records[END].body), **{field: value})  # type: ignore[arg-type]
    bad = assemble(with_body(END, end.encode()), seal=False)
    fails(bad, f"end record at byte {pos(END)} does not seal the archive: ", problem)


def test_index_that_lists_too_few_records() -> None:
    short_index = P.records[INDEX].body[: 3 * INDEX_ENTRY.size]
    bad = assemble(with_body(INDEX, short_index), keep_index=True)
    fails(bad, f"end record at byte {split(bad).records[END].pos} does not seal the archive",
          "the index lists 3 records, the archive holds 4")


def test_index_with_a_partial_entry() -> None:
    fails(assemble(with_body(INDEX, P.records[INDEX].body[:-1]), keep_index=True),
          f"index record at byte {pos(INDEX)} has a partial entry")


def test_footer_that_does_not_match() -> None:
    good = Footer.decode(SMALL[FOOTER_POS:], FOOTER_POS)
    for wrong in (replace(good, index_pos=good.index_pos + 1),
                  replace(good, end_pos=pos(INDEX)),
                  replace(good, archive_len=good.archive_len + 4096)):
        fails(SMALL[:FOOTER_POS] + wrong.encode(),
              f"the footer at byte {FOOTER_POS} does not match the archive")


# --- length fields: refused before anything is allocated -----------------------------


def _fails_small(data: bytes, *fragments: str) -> None:
    """Like :func:`fails`, and the reader may not allocate more than 1 MiB doing it."""
    tracemalloc.start()
    try:
        fails(data, *fragments)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"the reader allocated {peak} bytes to refuse this archive"


@pytest.mark.parametrize("length", [2**32 - 1, 2**31, MAX_BODY + 1])
def test_frame_body_length_over_the_limit(length: int) -> None:
    _fails_small(reframe(SMALL, pos(DATA0), body_len=length),
                 f"record at byte {pos(DATA0)} claims a body of {length} bytes "
                 f"(limit {MAX_BODY})")


def test_frame_body_length_at_the_limit_is_read_then_found_truncated() -> None:
    # A length under the limit is believed: the reader allocates it (bounded by MAX_BODY,
    # whatever the field says) and then finds the stream too short. This also shows that
    # _fails_small's measurement sees the reader's buffers.
    tracemalloc.start()
    try:
        fails(reframe(SMALL, pos(DATA0), body_len=MAX_BODY),
              f"truncated at byte {len(SMALL)} (inside record 5)")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert MAX_BODY <= peak < 2 * MAX_BODY


@pytest.mark.parametrize("length", [2**32 - 1, MAX_DATA_LENGTH + 1])
def test_data_length_over_the_limit(length: int) -> None:
    body = Chunk(0, Compression.NONE, 0, length).encode() + A
    _fails_small(assemble(with_body(DATA0, body)),
                 f"data record at byte {pos(DATA0)} has a length of {length} "
                 f"(must be 1..{MAX_DATA_LENGTH})")


def test_compression_bomb_is_refused_before_decompressing() -> None:
    # 64 MiB of zeros squeezed into a few KiB, in a record that claims 4096 bytes.
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 << 20))
    assert len(bomb) < 8192
    body = Chunk(0, Compression.ZSTD, 4096, 4096).encode() + bomb
    _fails_small(assemble(with_body(DATA1, body)),
                 f"device 'vda': data record at byte {pos(DATA1)}: compressed frame claims "
                 f"{64 << 20} bytes, expected 4096")


@pytest.mark.parametrize(
    ("offset", "length"), [(8192, 2**63), (2**64 - 1, 1), (2**63, 2**63), (0, 2**64 - 1)]
)
def test_zero_range_with_huge_fields(offset: int, length: int) -> None:
    _fails_small(assemble(with_body(ZERO, Zero(0, offset, length).encode())),
                 f"device 'vda': zero record at byte {pos(ZERO)} covers "
                 f"{offset}..{offset + length}, past the device's end (16384)")


def test_device_size_over_2_63() -> None:
    _fails_small(assemble(with_body(VDA, Device(0, "vda", 2**63).encode())),
                 "device 'vda' claims a size of 9223372036854775808 bytes (limit 2^63-1)")


def test_config_size_over_2_63() -> None:
    _fails_small(assemble(with_body(CFG, Config(0, "vm.conf", 2**64 - 1).encode())),
                 "config 'vm.conf' claims a size of 18446744073709551615 bytes")


def test_name_length_field_of_65535() -> None:
    body = struct.pack("<IQH", 1, 4096, 0xFFFF) + b"vdb"
    _fails_small(assemble(with_body(VDB, body)),
                 "device record has a name of 65535 bytes (limit 255)")


def test_property_length_field_of_2_32_minus_1() -> None:
    body = struct.pack("<IQH", 1, 4096, 3) + b"vdb" + struct.pack("<HH", 1, 1) + b"k"
    body += struct.pack("<I", 2**32 - 1) + b"value"
    _fails_small(assemble(with_body(VDB, body)), "device record is too short for its fields")


def test_encryption_parameter_length_of_2_32_minus_1() -> None:
    raw = HEADER.encode()
    at = 48 + 2 + len(HEADER.tool_version) + 2  # after tool_version and checkpoint
    body = raw[:at] + struct.pack("<I", 2**32 - 1) + raw[at + 4 :]
    data = write_archive(lambda w: None)
    parts = split(data)
    parts.records[0] = replace(parts.records[0], body=body)
    _fails_small(assemble(parts.records), "archive header record is too short for its fields")


# --- records that do not fit the devices ---------------------------------------------


def _write(build: Callable[[ArchiveWriter], None], kind: Kind = Kind.FULL) -> bytes:
    return write_archive(build, replace(HEADER, kind=kind))


def test_record_naming_a_device_that_does_not_exist() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 4096)
        w.write_data(0, 0, 4096, Compression.NONE, A)
        w.write_data(1, 0, 4096, Compression.NONE, A)

    parts = split(data := _write(build))
    fails(data, f"data record at byte {parts.records[3].pos} names device 1, "
                "which was never declared")


def test_zero_record_naming_a_device_that_does_not_exist() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 4096)
        w.write_zero(7, 0, 4096)

    parts = split(data := _write(build))
    fails(data, f"zero record at byte {parts.records[2].pos} names device 7")


def test_overlapping_data_records() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 16384)
        w.write_data(0, 4096, 4096, Compression.NONE, A)
        w.write_data(0, 2048, 4096, Compression.NONE, B)

    parts = split(data := _write(build, Kind.INCREMENTAL))
    fails(data, f"device 'vda': data record at byte {parts.records[3].pos} overlaps data "
                "already in the archive at device offset 4096")


def test_zero_record_overlapping_data() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 16384)
        w.write_data(0, 4096, 4096, Compression.NONE, A)
        w.write_zero(0, 0, 16384)

    parts = split(data := _write(build))
    fails(data, f"device 'vda': zero record at byte {parts.records[3].pos} overlaps",
          "at device offset 4096")


def test_range_past_the_device_end() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 8192)
        w.write_data(0, 0, 4096, Compression.NONE, A)
        w.write_zero(0, 4096, 8192)

    parts = split(data := _write(build))
    fails(data, f"device 'vda': zero record at byte {parts.records[3].pos} covers "
                "4096..12288, past the device's end (8192)")


def test_data_record_one_byte_past_the_end() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 4095)
        w.write_data(0, 0, 4096, Compression.NONE, A)

    fails(_write(build), "covers 0..4096, past the device's end (4095)")


def test_full_backup_with_a_gap() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 16384)
        w.add_device("vdb", 4096)
        w.write_data(1, 0, 4096, Compression.NONE, C)
        w.write_data(0, 0, 4096, Compression.NONE, A)
        w.write_zero(0, 8192, 4096)

    fails(_write(build), "device 'vda': bytes 4096..8192 are missing from this full backup "
                         "(2 gap(s) in all)")


def test_full_backup_missing_a_whole_device() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 4096)
        w.add_device("vdb", 100)
        w.write_data(0, 0, 4096, Compression.NONE, A)

    fails(_write(build), "device 'vdb': bytes 0..100 are missing from this full backup")


def test_incremental_backup_may_have_gaps() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 16384)
        w.write_data(0, 4096, 4096, Compression.NONE, A)

    c = read_archive(_write(build, Kind.INCREMENTAL))
    assert c.data == {"vda": [(4096, A)]}


# --- sequence: duplicated, dropped, reordered records ---------------------------------


def test_duplicated_record() -> None:
    r = recs()
    r.insert(DATA1, r[DATA1])  # the same record twice, with its own seq
    fails(assemble(r), f"record at byte {pos(DATA1) + len(P.records[DATA1].body) + 40} has "
                       "sequence number 6, expected 7: records were dropped, duplicated or "
                       "reordered")


@pytest.mark.parametrize("seal", [False, True])
def test_duplicated_record_renumbered_overlaps(seal: bool) -> None:
    r = recs()
    r.insert(DATA1, r[DATA1])
    second = pos(DATA1) + len(P.records[DATA1].body) + 40
    fails(assemble(renumber(r), seal=seal),
          f"device 'vda': data record at byte {second} overlaps data already in the archive "
          "at device offset 4096")


def test_duplicated_optional_record_renumbered_is_caught_by_the_seal() -> None:
    r = recs()
    r.insert(END, Rec(0x7001, b"note", flags=FLAG_OPTIONAL))
    sealed = assemble(renumber(r))
    assert read_archive(sealed).end.records == 11
    r = split(sealed).records
    r.insert(END, r[END])  # the optional record twice, renumbered, the old seal kept
    fails(assemble(renumber(r), seal=False), "does not seal the archive",
          "12 records present, the seal says 11", "the chained digest does not match")


def test_dropped_record() -> None:
    r = recs()
    del r[DATA1]
    fails(assemble(r), f"record at byte {pos(DATA1)} has sequence number 7, expected 6: "
                       "records were dropped")


def test_dropped_record_renumbered_is_caught_by_the_seal() -> None:
    r = recs()
    del r[DATA1]
    fails(assemble(renumber(r), seal=False), "does not seal the archive",
          "9 records present, the seal says 10", "the chained digest does not match",
          "data totals do not match")


def test_dropped_record_renumbered_and_resealed_leaves_a_gap() -> None:
    r = recs()
    del r[DATA1]
    fails(assemble(renumber(r)), "device 'vda': bytes 4096..8192 are missing")


def test_reordered_records() -> None:
    r = recs()
    r[DATA0], r[DATA_VDB] = r[DATA_VDB], r[DATA0]
    # Fresh frames with correct CRCs, a seal recomputed for this order: only seq is wrong.
    fails(assemble(r), f"record at byte {pos(DATA0)} has sequence number 7, expected 5: "
                       "records were dropped, duplicated or reordered")


def test_reordered_records_renumbered_are_caught_by_the_seal() -> None:
    r = recs()
    r[DATA0], r[DATA_VDB] = r[DATA_VDB], r[DATA0]
    msg = fails(assemble(renumber(r), seal=False), "the chained digest does not match")
    assert "records present" not in msg


def test_records_in_another_order_written_honestly_are_fine() -> None:
    r = recs()
    r[DATA0], r[DATA_VDB], r[ZERO] = r[ZERO], r[DATA0], r[DATA_VDB]
    c = read_archive(assemble(renumber(r)))
    assert c == replace(ORIGINAL, end=c.end)  # the chain differs: the order is part of it
    assert c.end.chain != ORIGINAL.end.chain


def test_metadata_after_device_data() -> None:
    r = recs()
    r.insert(DATA1, r.pop(VDB))  # now between the two DATA records of vda
    bad = assemble(renumber(r))
    moved = split(bad).records[DATA1].pos
    fails(bad, f"device record at byte {moved} comes after device data")


def test_second_header_record() -> None:
    r = recs()
    r.insert(ZERO, r[HDR])
    fails(assemble(renumber(r)), f"header record at byte {pos(ZERO)} comes after device data")


def test_data_after_the_index() -> None:
    r = recs()
    r.insert(INDEX, r.pop(ZERO))  # between INDEX and END
    fails(assemble(renumber(r), keep_index=True), "zero record at byte", "comes after the index")


def test_config_data_out_of_order() -> None:
    r = recs()
    first = Chunk(0, Compression.NONE, 0, 9).encode() + CONFIG[:9]
    second = Chunk(0, Compression.NONE, 9, len(CONFIG) - 9).encode() + CONFIG[9:]
    r[CFG_DATA : CFG_DATA + 1] = [Rec(RecordType.CONFIG_DATA, second),
                                  Rec(RecordType.CONFIG_DATA, first)]
    fails(assemble(renumber(r)), f"config data record at byte {pos(CFG_DATA)}: config "
                                 "'vm.conf' data out of order or too long")
    r[CFG_DATA : CFG_DATA + 2] = r[CFG_DATA + 1 : CFG_DATA + 2] + r[CFG_DATA : CFG_DATA + 1]
    assert read_archive(assemble(renumber(r))).configs == {"vm.conf": CONFIG}


def test_config_data_too_long() -> None:
    body = Chunk(0, Compression.NONE, 0, len(CONFIG) + 1).encode() + CONFIG + b"!"
    fails(assemble(with_body(CFG_DATA, body)),
          f"config data record at byte {pos(CFG_DATA)}: config 'vm.conf' data out of order "
          "or too long")


def test_config_data_missing() -> None:
    r = recs()
    del r[CFG_DATA]
    fails(assemble(renumber(r)), "config 'vm.conf' is incomplete in the archive")


def test_config_data_for_an_undeclared_config() -> None:
    body = Chunk(3, Compression.NONE, 0, len(CONFIG)).encode() + CONFIG
    fails(assemble(with_body(CFG_DATA, body)),
          f"config data record at byte {pos(CFG_DATA)} names config 3, which was never declared")


# --- names and ids --------------------------------------------------------------------


def test_duplicated_device_name() -> None:
    fails(assemble(with_body(VDB, Device(1, "vda", 4096).encode())),
          f"device name 'vda' appears twice (byte {pos(VDB)})")


def test_duplicated_config_name() -> None:
    r = recs()
    r.insert(CFG_DATA + 1, Rec(RecordType.CONFIG, Config(1, "vm.conf", 0).encode()))
    fails(assemble(renumber(r)), f"config name 'vm.conf' appears twice (byte {pos(DATA0)})")


def test_device_ids_must_count_up() -> None:
    fails(assemble(with_body(VDB, Device(5, "vdb", 4096).encode())),
          f"device record at byte {pos(VDB)} has id 5, expected 1")


def test_device_name_that_is_a_path() -> None:
    fails(assemble(with_body(VDB, Device(1, "../../etc/passwd", 4096).encode())),
          "device name '../../etc/passwd' is not allowed")


# --- versions and unknown records -----------------------------------------------------


def test_unknown_major_version() -> None:
    for major in (0, 2, 0xFFFF):
        bad = MAGIC + struct.pack("<HHI", major, 0, 0) + SMALL[16:]
        fails(bad, f"archive format version {major} is not supported (this backup-agent "
                   "reads version 1)", exc=UnsupportedArchive)


def test_newer_minor_version_is_read() -> None:
    newer = read_archive(assemble(recs(), preamble=MAGIC + struct.pack("<HHI", 1, 3, 0)))
    # The same archive but for its seal, which covers the preamble.
    assert newer.end.chain != ORIGINAL.end.chain
    assert replace(newer, end=replace(newer.end, chain=ORIGINAL.end.chain)) == ORIGINAL


def test_unknown_required_record_type() -> None:
    r = recs()
    r.insert(END, Rec(0x0030, b"future"))
    fails(assemble(renumber(r)), f"record type 0x0030 at byte {pos(END)} is required to read "
                                 "this archive but unknown", exc=UnsupportedArchive)


def test_unknown_required_record_type_among_metadata() -> None:
    r = recs()
    r.insert(VDA, Rec(0x0005, b"future"))
    fails(assemble(renumber(r)), f"record type 0x0005 at byte {pos(VDA)} is required",
          exc=UnsupportedArchive)


@pytest.mark.parametrize("where", [VDA, CFG, DATA0, DATA1, INDEX, END])
def test_unknown_optional_record_type_is_skipped(where: int) -> None:
    r = recs()
    r.insert(where, Rec(0x7001, b"something a later version adds", flags=FLAG_OPTIONAL))
    c = read_archive(assemble(renumber(r)))
    assert c == replace(ORIGINAL, end=c.end)
    assert c.end.records == 11


def test_unknown_optional_record_with_a_bad_digest() -> None:
    r = recs()
    r.insert(DATA0, Rec(0x7001, b"payload", flags=FLAG_OPTIONAL, digest=bytes(16)))
    fails(assemble(renumber(r)),
          f"optional record of type 0x7001 at byte {pos(DATA0)} fails its checksum")


def test_unknown_frame_flags() -> None:
    fails(reframe(SMALL, pos(DATA0), flags=0x8000),
          f"record at byte {pos(DATA0)} has unknown flags 0x8000", exc=UnsupportedArchive)


def test_unknown_compression_method() -> None:
    body = bytearray(P.records[DATA0].body)
    body[4] = 9
    fails(assemble(with_body(DATA0, bytes(body))),
          f"data record at byte {pos(DATA0)} uses unknown compression 9", exc=UnsupportedArchive)


@pytest.mark.parametrize(("offset", "what"), [(40, "kind 7"), (41, "encryption method 7"),
                                              (42, "digest algorithm 7")])
def test_header_feature_we_lack(offset: int, what: str) -> None:
    body = bytearray(P.records[HDR].body)
    body[offset] = 7
    fails(assemble(with_body(HDR, bytes(body))), what, "not supported", exc=UnsupportedArchive)


# --- after the footer -----------------------------------------------------------------


def test_trailing_zero_padding_is_accepted() -> None:
    tape_block = 10240
    padded = SMALL + bytes(-len(SMALL) % tape_block)
    assert read_archive(padded) == ORIGINAL
    assert read_archive(SMALL + bytes(3 << 20)) == ORIGINAL  # more than one 1 MiB read


@pytest.mark.parametrize("zeros", [0, 1, 100, (1 << 20) + 5])
def test_trailing_garbage_after_the_footer(zeros: int) -> None:
    bad = SMALL + bytes(zeros) + b"\x01" + bytes(10)
    fails(bad, f"unexpected data after the end of the archive at byte {len(SMALL) + zeros}")


def test_two_archives_back_to_back() -> None:
    fails(SMALL + SMALL, f"unexpected data after the end of the archive at byte {len(SMALL)}")


def test_header_only_archive_is_fine() -> None:
    c = read_archive(write_archive(lambda w: None))
    assert (c.devices, c.configs, c.end.records) == ({}, {}, 1)


def test_damaged_kind_field_reads_as_damage_not_as_unsupported() -> None:
    # A flipped bit that turns the kind into an unknown value must be reported as damage.
    bad = flip(SMALL, body_pos(HDR) + 40, 0x04)
    msg = fails(bad, "header record at byte 16 fails its checksum")
    assert "not supported" not in msg


def test_split_finds_what_the_cases_rely_on() -> None:
    assert pos(HDR) == 16
    assert P.tail == SMALL[FOOTER_POS:]
    assert Header.decode(P.records[HDR].body) == HEADER
