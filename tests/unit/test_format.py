"""The archive format, piece by piece: record bodies, frames, preamble, footer, the
interval set, the codec, and the worked example of docs/FORMAT.md (tests/data/tiny.arc)."""

from __future__ import annotations

import io
import random
import re
import struct
import uuid
import zlib
from pathlib import Path

import blake3
import pytest
import zstandard

from agent.archive import codec
from agent.archive.codec import CompressionSpec
from agent.archive.format import (
    CHUNK_FIXED,
    DIGEST_SIZE,
    FLAG_OPTIONAL,
    FOOTER,
    FRAME,
    FRAME_MAGIC,
    INDEX_ENTRY,
    MAGIC,
    MAX_BODY,
    MAX_DATA_LENGTH,
    MAX_DEVICE_SIZE,
    NO_INDEX,
    PREAMBLE,
    VERSION_MAJOR,
    Chain,
    Chunk,
    Compression,
    Config,
    Device,
    End,
    Footer,
    Header,
    IndexEntry,
    Kind,
    RecordType,
    Zero,
    check_name,
    check_preamble,
    decode_index,
    digest,
    header_crc,
    pack_frame,
    pack_preamble,
    unpack_frame,
)
from agent.archive.intervals import IntervalSet, Overlap
from agent.archive.reader import ArchiveReader, DataRecord
from agent.archive.writer import ArchiveWriter
from agent.errors import ArchiveError, UnsupportedArchive
from tests.data import make_tiny
from tests.unit.archive_util import read_archive, split, write_archive

REPO = Path(__file__).resolve().parents[2]
FORMAT_MD = REPO / "docs" / "FORMAT.md"

# --- constants the spec states ----------------------------------------------------------


def test_fixed_sizes_and_constants() -> None:
    assert PREAMBLE.size == 16
    assert FRAME.size == 24
    assert DIGEST_SIZE == 16
    assert FOOTER.size == 48
    assert INDEX_ENTRY.size == 32
    assert CHUNK_FIXED == 24
    assert MAGIC == b"\x89BAGENT\n"
    assert FRAME_MAGIC == b"BREC"
    assert MAX_DATA_LENGTH == 32 * 1024 * 1024
    assert MAX_BODY == MAX_DATA_LENGTH + 64 * 1024
    assert MAX_DEVICE_SIZE == 2**63 - 1
    assert NO_INDEX == 2**64 - 1
    assert FLAG_OPTIONAL == 1
    assert {t.name: int(t) for t in RecordType} == {
        "HEADER": 0x01, "DEVICE": 0x02, "CONFIG": 0x03, "CONFIG_DATA": 0x04, "DETAILS": 0x08,
        "DATA": 0x10, "ZERO": 0x11, "INDEX": 0x20, "END": 0xFF,
    }


# --- preamble ---------------------------------------------------------------------------


def test_preamble_layout() -> None:
    raw = pack_preamble()
    assert raw == MAGIC + struct.pack("<HHI", VERSION_MAJOR, 0, 0)
    check_preamble(raw)


def test_preamble_errors() -> None:
    with pytest.raises(ArchiveError, match="empty"):
        check_preamble(b"")
    with pytest.raises(ArchiveError, match="truncated: only 7 bytes"):
        check_preamble(pack_preamble()[:7])
    with pytest.raises(ArchiveError, match="bad magic at byte 0"):
        check_preamble(b"\x89BAGENT\r" + pack_preamble()[8:])
    with pytest.raises(UnsupportedArchive, match="version 2 is not supported"):
        check_preamble(MAGIC + struct.pack("<HHI", 2, 0, 0))
    with pytest.raises(UnsupportedArchive, match="unknown flags 0x4"):
        check_preamble(MAGIC + struct.pack("<HHI", 1, 0, 4))
    # A newer minor version is read: it only adds what old readers may ignore.
    check_preamble(MAGIC + struct.pack("<HHI", 1, 7, 0))


# --- frames -----------------------------------------------------------------------------


def test_frame_round_trip_and_crc() -> None:
    raw = pack_frame(RecordType.DATA, FLAG_OPTIONAL, 2**40 + 3, 12345)
    assert len(raw) == 24
    assert raw[:4] == b"BREC"
    assert struct.unpack("<HHQI", raw[4:20]) == (0x10, 1, 2**40 + 3, 12345)
    assert struct.unpack("<I", raw[20:])[0] == zlib.crc32(raw[:20]) == header_crc(raw[:20])
    fr = unpack_frame(raw, 99)
    assert (fr.rtype, fr.flags, fr.seq, fr.body_len) == (0x10, 1, 2**40 + 3, 12345)


def test_frame_every_bit_flip_is_caught() -> None:
    raw = pack_frame(RecordType.ZERO, 0, 5, 24)
    for bit in range(24 * 8):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ArchiveError, match="at byte 500"):
            unpack_frame(bytes(bad), 500)


def test_frame_errors_name_the_problem() -> None:
    with pytest.raises(ArchiveError, match="no record at byte 40: bad record magic b'XREC'"):
        unpack_frame(b"X" + pack_frame(1, 0, 0, 0)[1:], 40)
    bad_crc = pack_frame(1, 0, 0, 0)[:20] + b"\0\0\0\0"
    with pytest.raises(ArchiveError, match=r"header at byte 40 is damaged \(CRC mismatch\)"):
        unpack_frame(bad_crc, 40)
    with pytest.raises(ArchiveError, match=f"claims a body of {MAX_BODY + 1} bytes "
                                           f"\\(limit {MAX_BODY}\\)"):
        unpack_frame(pack_frame(0x10, 0, 0, MAX_BODY + 1), 40)
    assert unpack_frame(pack_frame(0x10, 0, 0, MAX_BODY), 40).body_len == MAX_BODY


def test_digest_is_blake3_truncated_to_128_bits() -> None:
    body = b"some record body"
    assert digest(body) == blake3.blake3(body).digest()[:16]
    assert len(digest(b"")) == 16


def test_chain_is_blake3_over_frames_and_digests() -> None:
    frames = [(pack_frame(1, 0, i, 3), digest(bytes([i]) * 3)) for i in range(3)]
    c = Chain(pack_preamble())
    for f, d in frames:
        c.add(f, d)
    assert c.value() == blake3.blake3(
        pack_preamble() + b"".join(f + d for f, d in frames)).digest()
    assert len(c.value()) == 32


# --- record bodies ----------------------------------------------------------------------


def test_header_round_trip_all_fields() -> None:
    h = Header(
        uuid=uuid.UUID(int=7), created_ns=-5, tool_version="backup-agent 9.9",
        kind=Kind.INCREMENTAL, parent_uuid=uuid.UUID(int=6), checkpoint="bitmap-3",
        props={"host": "hv1", "vm": "web", "empty": ""},
    )
    raw = h.encode()
    assert raw[:16] == uuid.UUID(int=7).bytes  # UUIDs are stored in RFC 4122 byte order
    assert raw[16:32] == uuid.UUID(int=6).bytes
    assert struct.unpack("<qBBBBI", raw[32:48]) == (-5, 1, 0, 1, 0, 0)
    assert Header.decode(raw) == h


def test_header_without_parent_stores_zeros() -> None:
    h = Header(uuid=uuid.UUID(int=1), created_ns=0, tool_version="x")
    raw = h.encode()
    assert raw[16:32] == bytes(16)
    assert Header.decode(raw) == h
    assert Header.decode(raw).parent_uuid is None


def test_header_trailing_bytes_are_ignored() -> None:
    h = Header(uuid=uuid.UUID(int=1), created_ns=0, tool_version="x")
    assert Header.decode(h.encode() + b"a later minor version's field") == h


def test_header_refuses_what_it_cannot_read() -> None:
    raw = bytearray(Header(uuid=uuid.UUID(int=1), created_ns=0, tool_version="x").encode())
    kind, enc, halgo = 40, 41, 42
    with pytest.raises(UnsupportedArchive, match="archive kind 9"):
        Header.decode(bytes(raw[:kind]) + b"\x09" + bytes(raw[kind + 1 :]))
    with pytest.raises(UnsupportedArchive, match="encryption method 2"):  # 1: crypto.py
        Header.decode(bytes(raw[:enc]) + b"\x02" + bytes(raw[enc + 1 :]))
    with pytest.raises(UnsupportedArchive, match="digest algorithm 2"):
        Header.decode(bytes(raw[:halgo]) + b"\x02" + bytes(raw[halgo + 1 :]))
    with pytest.raises(ArchiveError, match="archive header record is too short"):
        Header.decode(bytes(raw[:47]))
    with pytest.raises(ArchiveError, match="archive header record is too short"):
        Header.decode(bytes(raw[:-1]))


def test_header_encryption_parameters_are_skipped() -> None:
    h = Header(uuid=uuid.UUID(int=1), created_ns=0, tool_version="x", props={"a": "b"})
    raw = h.encode()
    # tool_version "x" (2+1), checkpoint "" (2), then u32 parameter length 0 at 53.
    assert raw[53:57] == b"\0\0\0\0"
    with_params = raw[:53] + struct.pack("<I", 3) + b"KEY" + raw[57:]
    assert Header.decode(with_params) == h


def test_device_round_trip() -> None:
    d = Device(3, "vda", MAX_DEVICE_SIZE, {"format": "qcow2", "serial": "Ω"})
    raw = d.encode()
    assert struct.unpack("<IQ", raw[:12]) == (3, MAX_DEVICE_SIZE)
    assert raw[12:17] == b"\x03\x00vda"
    assert Device.decode(raw) == d
    assert Device.decode(Device(0, "a", 0).encode()) == Device(0, "a", 0)


def test_device_errors() -> None:
    with pytest.raises(ArchiveError, match=r"device 'vda' claims a size of 9223372036854775808"):
        Device.decode(Device(0, "vda", 2**63).encode())
    with pytest.raises(ArchiveError, match=r"device name '\.\./etc' is not allowed"):
        Device.decode(Device(0, "../etc", 1).encode())
    with pytest.raises(ArchiveError, match="device record is too short"):
        Device.decode(Device(0, "vda", 1).encode()[:-1])
    with pytest.raises(ArchiveError, match="name of 256 bytes"):
        Device.decode(Device(0, "a" * 256, 1).encode())
    bad_utf8 = struct.pack("<IQH", 0, 1, 2) + b"\xff\xfe" + b"\0\0"
    with pytest.raises(ArchiveError, match="device record has a name that is not UTF-8"):
        Device.decode(bad_utf8)


def test_config_round_trip_and_errors() -> None:
    c = Config(1, "vm.conf", 10 * 2**20)
    raw = c.encode()
    assert struct.unpack("<IQ", raw[:12]) == (1, 10 * 2**20)
    assert Config.decode(raw) == c
    with pytest.raises(ArchiveError, match="config 'x' claims a size"):
        Config.decode(Config(0, "x", 2**64 - 1).encode())
    with pytest.raises(ArchiveError, match="config name '-rf' is not allowed"):
        Config.decode(Config(0, "-rf", 1).encode())


def test_chunk_round_trip() -> None:
    ch = Chunk(2, Compression.ZSTD, 2**62, MAX_DATA_LENGTH)
    raw = ch.encode()
    assert len(raw) == CHUNK_FIXED
    assert struct.unpack("<IBBHQII", raw) == (2, 1, 0, 0, 2**62, MAX_DATA_LENGTH, 0)
    assert Chunk.decode(raw + b"compressed", "data record") == ch
    stored = Chunk(0, Compression.NONE, 0, 5)
    assert Chunk.decode(stored.encode() + b"12345", "data record") == stored


def test_chunk_errors() -> None:
    with pytest.raises(ArchiveError, match="data record has a length of 0"):
        Chunk.decode(Chunk(0, Compression.NONE, 0, 0).encode(), "data record")
    too_long = Chunk(0, Compression.ZSTD, 0, MAX_DATA_LENGTH + 1).encode()
    with pytest.raises(ArchiveError, match=f"length of {MAX_DATA_LENGTH + 1} "
                                           f"\\(must be 1..{MAX_DATA_LENGTH}\\)"):
        Chunk.decode(too_long, "data record")
    with pytest.raises(ArchiveError, match="stores 4 bytes but claims 5"):
        Chunk.decode(Chunk(0, Compression.NONE, 0, 5).encode() + b"1234", "data record")
    bad_comp = struct.pack("<IBBHQII", 0, 7, 0, 0, 0, 5, 0) + b"12345"
    with pytest.raises(UnsupportedArchive, match="config data record uses unknown compression 7"):
        Chunk.decode(bad_comp, "config data record")
    with pytest.raises(ArchiveError, match="data record is too short"):
        Chunk.decode(b"\0" * 23, "data record")


def test_zero_round_trip_and_errors() -> None:
    z = Zero(4, 2**40, 2**63 - 1)
    raw = z.encode()
    assert raw == struct.pack("<IIQQ", 4, 0, 2**40, 2**63 - 1)
    assert Zero.decode(raw) == z
    with pytest.raises(ArchiveError, match="zero record has a length of 0"):
        Zero.decode(Zero(0, 0, 0).encode())
    with pytest.raises(ArchiveError, match="zero record is too short"):
        Zero.decode(raw[:20])


def test_index_round_trip_and_errors() -> None:
    entries = [
        IndexEntry(RecordType.DATA, Compression.ZSTD, 0, 0, 4096, 312),
        IndexEntry(RecordType.ZERO, Compression.NONE, 1, 2**40, 2**41, 2**50),
    ]
    raw = b"".join(
        INDEX_ENTRY.pack(e.rtype & 0xFF, e.compression, 0, e.device, e.offset, e.length, e.pos)
        for e in entries
    )
    assert len(raw) == 64
    assert decode_index(raw) == entries
    assert decode_index(b"") == []
    with pytest.raises(ArchiveError, match="partial entry"):
        decode_index(raw[:40])
    with pytest.raises(ArchiveError, match="unknown record type 5"):
        decode_index(INDEX_ENTRY.pack(5, 0, 0, 0, 0, 1, 0))


def test_end_round_trip() -> None:
    e = End(records=7, data_bytes=2**50, zero_bytes=3, stored_bytes=4, devices=5, configs=6,
            chain=bytes(range(32)))
    raw = e.encode()
    assert len(raw) == 72
    assert struct.unpack("<QQQQII", raw[:40]) == (7, 2**50, 3, 4, 5, 6)
    assert raw[40:] == bytes(range(32))
    assert End.decode(raw) == e
    with pytest.raises(ArchiveError, match="end record is too short"):
        End.decode(raw[:71])


# --- footer -----------------------------------------------------------------------------


def test_footer_round_trip() -> None:
    f = Footer(index_pos=1000, end_pos=2000, archive_len=2160)
    raw = f.encode()
    assert len(raw) == 48
    assert raw[:8] == b"BAFOOTER"
    assert struct.unpack("<QQQ", raw[8:32]) == (1000, 2000, 2160)
    assert raw[32:] == blake3.blake3(raw[:32]).digest()[:16]
    assert Footer.decode(raw, 2112) == f
    assert Footer.decode(Footer(NO_INDEX, 16, 100).encode(), 52).index_pos == NO_INDEX


def test_footer_errors() -> None:
    raw = Footer(1000, 2000, 2160).encode()
    with pytest.raises(ArchiveError, match="truncated inside its footer at byte 2112"):
        Footer.decode(raw[:47], 2112)
    with pytest.raises(ArchiveError, match="bad footer magic at byte 2112"):
        Footer.decode(b"X" + raw[1:], 2112)
    for i in range(8, 48):
        bad = bytearray(raw)
        bad[i] ^= 0x80
        with pytest.raises(ArchiveError, match=r"footer at byte 2112 is damaged"):
            Footer.decode(bytes(bad), 2112)


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vda", "a", "_", "disk-0.qcow2", "A+B", "9", "x" * 255])
def test_good_names(name: str) -> None:
    check_name(name, "device")


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".hidden", "-rf", "+x", "a/b", "a b", "ä", "x" * 256, "a\n", "a\0"]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(ArchiveError, match=r"device name .* is not allowed"):
        check_name(name, "device")


# --- IntervalSet ------------------------------------------------------------------------


def test_intervals_merge_adjacent_ranges() -> None:
    s = IntervalSet()
    s.add(0, 10)
    s.add(20, 30)
    assert len(s) == 2
    s.add(10, 20)  # joins both neighbours
    assert len(s) == 1
    s.add(30, 40)  # joins on the left
    s.add(50, 60)
    s.add(45, 50)  # joins on the right
    assert len(s) == 2
    assert s.total == 55
    assert s.gaps(60) == [(40, 45)]


def test_intervals_in_any_order() -> None:
    rng = random.Random(1)
    pieces = [(i * 7, i * 7 + 7) for i in range(200)]
    rng.shuffle(pieces)
    s = IntervalSet()
    for a, b in pieces[:150]:
        s.add(a, b)
    assert s.total == 150 * 7
    for a, b in pieces[150:]:
        s.add(a, b)
    assert len(s) == 1
    assert s.gaps(1400) == []
    assert s.gaps(1410) == [(1400, 1410)]


@pytest.mark.parametrize(
    ("new", "where"),
    [
        ((10, 20), (10, 20)),  # the same range
        ((5, 15), (10, 15)),  # overlaps the start
        ((15, 25), (15, 20)),  # overlaps the end
        ((12, 18), (12, 18)),  # inside
        ((0, 40), (10, 20)),  # contains
        ((19, 20), (19, 20)),  # the last byte
    ],
)
def test_intervals_overlap_detection(new: tuple[int, int], where: tuple[int, int]) -> None:
    s = IntervalSet()
    s.add(10, 20)
    s.add(30, 31)
    with pytest.raises(Overlap) as e:
        s.add(*new)
    assert (e.value.start, e.value.end) == where
    assert s.total == 11  # a refused range leaves the set unchanged


def test_intervals_gaps_and_bad_ranges() -> None:
    s = IntervalSet()
    assert s.gaps(0) == []
    assert s.gaps(100) == [(0, 100)]
    s.add(10, 20)
    s.add(50, 100)
    assert s.gaps(100) == [(0, 10), (20, 50)]
    assert s.gaps(120) == [(0, 10), (20, 50), (100, 120)]
    with pytest.raises(ValueError, match="empty range"):
        s.add(5, 5)
    with pytest.raises(ValueError, match="empty range"):
        s.add(6, 5)


# --- codec ------------------------------------------------------------------------------


def test_codec_round_trip() -> None:
    data = b"backup-agent " * 1000
    comp, packed = codec.compress(data, CompressionSpec.parse("zstd:3"))
    assert comp == Compression.ZSTD
    assert len(packed) < len(data)
    assert zstandard.frame_content_size(packed) == len(data)  # the length is in the frame
    assert codec.decompress(comp, packed, len(data), "here") == data


def test_codec_stores_incompressible_payload() -> None:
    data = random.Random(0).randbytes(4096)
    comp, packed = codec.compress(data, CompressionSpec())
    assert comp == Compression.NONE
    assert packed == data
    assert codec.decompress(comp, packed, len(data), "here") == data


def test_codec_none_never_compresses() -> None:
    data = bytes(4096)
    assert codec.compress(data, CompressionSpec.parse("none")) == (Compression.NONE, data)


def test_codec_decompresses_into_a_given_buffer() -> None:
    data = b"backup-agent " * 1000
    comp, packed = codec.compress(data, CompressionSpec())
    out = bytearray(2 * len(data))  # larger than needed, as reused buffers are
    got = codec.decompress(comp, packed, len(data), "here", out)
    assert isinstance(got, memoryview) and got.obj is out  # no new allocation
    assert got == data
    # A stored payload is returned as it is; ``out`` is not touched.
    assert codec.decompress(Compression.NONE, data, len(data), "here", out) is data


def _claiming(data: bytes, claim: int) -> bytes:
    """A zstd frame of ``data`` whose header says it holds ``claim`` bytes (its 2-byte
    content-size field, which stores the size minus 256)."""
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(data))
    assert frame[4] >> 6 == 1 and 256 <= claim < 65536 + 256  # the 2-byte form
    struct.pack_into("<H", frame, 5, claim - 256)
    assert zstandard.frame_content_size(bytes(frame)) == claim
    return bytes(frame)


@pytest.mark.parametrize("into", [False, True], ids=["new", "into"])
def test_codec_decompress_errors(into: bool) -> None:
    out = bytearray(MAX_DATA_LENGTH + 1) if into else None
    data = b"abc" * 1000
    _, packed = codec.compress(data, CompressionSpec())
    with pytest.raises(ArchiveError, match="here: stored 3000 bytes, expected 2999"):
        codec.decompress(Compression.NONE, data, 2999, "here", out)
    with pytest.raises(ArchiveError, match="here: compressed frame claims 3000 bytes, expected 10"):
        codec.decompress(Compression.ZSTD, packed, 10, "here", out)
    with pytest.raises(ArchiveError, match="here: cannot decompress"):
        codec.decompress(Compression.ZSTD, b"not zstd at all", 15, "here", out)
    with pytest.raises(ArchiveError, match=r"here: length \d+ is over the limit"):
        codec.decompress(Compression.ZSTD, packed, MAX_DATA_LENGTH + 1, "here", out)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    with pytest.raises(ArchiveError, match="here: compressed frame claims -1 bytes"):
        codec.decompress(Compression.ZSTD, unsized, len(data), "here", out)
    # A frame cut short, or holding less than it claims: zstd reports it, or it yields
    # too few bytes.
    short = r"here: (cannot decompress|decompressed to \d+ bytes, expected 300[01])"
    with pytest.raises(ArchiveError, match=short):
        codec.decompress(Compression.ZSTD, packed[:-5], len(data), "here", out)
    with pytest.raises(ArchiveError, match=short):
        codec.decompress(Compression.ZSTD, _claiming(data, 3001), 3001, "here", out)
    # A frame holding more than it claims.
    with pytest.raises(ArchiveError, match="here: cannot decompress"):
        codec.decompress(Compression.ZSTD, _claiming(data, 2999), 2999, "here", out)


@pytest.mark.parametrize(
    ("text", "method", "level"),
    [
        ("none", Compression.NONE, 0),
        ("zstd", Compression.ZSTD, 1),  # the default level
        ("zstd:1", Compression.ZSTD, 1),
        ("zstd:19", Compression.ZSTD, 19),
        ("zstd:22", Compression.ZSTD, 22),
        ("zstd:-7", Compression.ZSTD, -7),
    ],
)
def test_compression_spec_parse(text: str, method: Compression, level: int) -> None:
    spec = CompressionSpec.parse(text)
    assert (spec.method, spec.level) == (method, level)
    assert CompressionSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("gzip", "unknown compression 'gzip'"),
        ("", "unknown compression ''"),
        ("ZSTD", "unknown compression 'ZSTD'"),
        ("none:1", "unknown compression 'none:1'"),
        ("zstd:fast", "zstd level 'fast' is not a number"),
        ("zstd:23", "zstd level 23 is out of range"),
        ("zstd:-8", "zstd level -8 is out of range"),
    ],
)
def test_compression_spec_parse_bad(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        CompressionSpec.parse(text)


# --- whole archives ---------------------------------------------------------------------


def test_round_trip_many_devices_any_order() -> None:
    rng = random.Random(5)
    blocks = {
        "vda": [bytes([i]) * 3000 + rng.randbytes(1096) for i in range(6)],
        "vdb": [rng.randbytes(4096) for _ in range(3)],
    }
    order = [(name, i) for name, bl in blocks.items() for i in range(len(bl))]
    rng.shuffle(order)
    big_config = b"line\n" * (1024 * 1024)  # 5 MiB: two CONFIG_DATA records

    def build(w: ArchiveWriter) -> None:
        ids = {
            "vda": w.add_device("vda", 6 * 4096 + 4096, {"format": "raw"}).id,
            "vdb": w.add_device("vdb", 3 * 4096).id,
        }
        w.add_config("vm.conf", big_config, CompressionSpec())
        w.add_config("empty.conf", b"", CompressionSpec())
        for name, i in order:
            comp, payload = codec.compress(blocks[name][i], CompressionSpec.parse("zstd:1"))
            w.write_data(ids[name], i * 4096, 4096, comp, payload)
        w.write_zero(ids["vda"], 6 * 4096, 4096)

    data = write_archive(build)
    c = read_archive(data)
    assert c.devices == {"vda": 7 * 4096, "vdb": 3 * 4096}
    assert c.configs == {"vm.conf": big_config, "empty.conf": b""}
    assert c.image("vda") == b"".join(blocks["vda"]) + bytes(4096)
    assert c.image("vdb") == b"".join(blocks["vdb"])
    assert c.zeros == {"vda": [(6 * 4096, 4096)], "vdb": []}
    parts = split(data)
    kinds = [RecordType(r.rtype) for r in parts.records]
    assert kinds.count(RecordType.CONFIG_DATA) == 2
    assert c.end.records == len(kinds) - 1
    assert c.end.data_bytes == 9 * 4096
    assert c.end.zero_bytes == 4096


def _compressible_blocks(n: int, size: int) -> list[bytes]:
    rng = random.Random(n)
    return [bytes(rng.choice(b"ab") for _ in range(size)) for _ in range(n)]


def _write_blocks(blocks: list[bytes], size: int) -> bytes:
    def build(w: ArchiveWriter) -> None:
        dev = w.add_device("vda", len(blocks) * size).id
        for i, block in enumerate(blocks):
            comp, payload = codec.compress(block, CompressionSpec())
            assert comp == Compression.ZSTD
            w.write_data(dev, i * size, size, comp, payload)

    return write_archive(build)


def test_released_records_lend_their_buffers_to_later_ones() -> None:
    # Restore reads bodies into, and decompresses into, buffers that earlier records gave
    # back: after a warm-up, no record allocates.
    size = 64 * 1024
    blocks = _compressible_blocks(12, size)
    r = ArchiveReader(io.BytesIO(_write_blocks(blocks, size)))
    outs, bodies = set(), set()
    for rec in r.records():
        assert isinstance(rec, DataRecord)
        got = rec.data()
        assert got == blocks[rec.offset // size]
        assert isinstance(got, memoryview)
        outs.add(id(got.obj))
        bodies.add(id(rec.raw.body.obj))
        rec.release()
        rec.release()  # twice is harmless: nothing is given back twice
    assert len(outs | bodies) == 2  # one buffer for bodies, one for payloads, all along


def test_records_not_released_keep_their_own_buffers() -> None:
    size = 64 * 1024
    blocks = _compressible_blocks(6, size)
    r = ArchiveReader(io.BytesIO(_write_blocks(blocks, size)))
    held = [rec.data() for rec in r.records() if isinstance(rec, DataRecord)]
    assert [bytes(d) for d in held] == blocks  # none overwritten by a later record


class _Trickle(io.RawIOBase):
    """A stream that, like a pipe, returns at most ``most`` bytes per read (a random
    amount with a ``seed``), and records how many bytes each read asked for."""

    def __init__(self, data: bytes, most: int, seed: int | None = None) -> None:
        self._data = data
        self._pos = 0
        self._most = most
        self._rng = random.Random(seed) if seed is not None else None
        self.asked: list[int] = []

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        self.asked.append(len(b))
        most = self._rng.randint(1, self._most) if self._rng else self._most
        n = min(len(b), most, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def _mixed_archive() -> tuple[bytes, dict[int, bytes]]:
    """Records of every size around the reader's thresholds, compressed and not."""
    rng = random.Random(5)
    blocks = {}
    offset = 0
    for size in (512, 4096, 65536, 262143, 262144, 300_000, 2 * 1024 * 1024, 100, 1 << 20):
        blocks[offset] = rng.randbytes(size) if size % 2 else bytes(rng.choice(b"xy")
                                                                    for _ in range(size))
        offset += size

    def build(w: ArchiveWriter) -> None:
        dev = w.add_device("vda", offset).id
        for off, block in blocks.items():
            comp, payload = codec.compress(block, CompressionSpec())
            w.write_data(dev, off, len(block), comp, payload)

    return write_archive(build), blocks


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.slow
def test_short_reads_from_a_pipe_like_stream(seed: int) -> None:
    data, blocks = _mixed_archive()
    r = ArchiveReader(_Trickle(data, 100_000, seed))  # type: ignore[arg-type]
    got = {rec.offset: bytes(rec.data()) for rec in r.records() if isinstance(rec, DataRecord)}
    assert got == blocks
    assert r.archive_len == len(data)


def test_large_bodies_are_not_read_ahead() -> None:
    # After a large body, a refill asks only for the digest and the next frame header,
    # so that the next (large) body goes straight into its own buffer, not through the
    # read-ahead buffer and a copy.
    size = 2 * 1024 * 1024
    rng = random.Random(1)

    def build(w: ArchiveWriter) -> None:
        dev = w.add_device("vda", 3 * size).id
        for i in range(3):
            w.write_data(dev, i * size, size, Compression.NONE, rng.randbytes(size))

    stream = _Trickle(write_archive(build), 1 << 30)  # every read whole, as from a file
    r = ArchiveReader(stream)  # type: ignore[arg-type]
    assert sum(1 for _ in r.records()) == 3
    # The first body begins in the read-ahead of the metadata; the other two are each
    # read whole, with one read; each body is followed by a read of exactly its digest
    # and the next frame header.
    assert stream.asked.count(size + CHUNK_FIXED) == 2
    assert stream.asked.count(DIGEST_SIZE + FRAME.size) == 3


def test_index_entries_point_at_their_records() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 3 * 4096)
        w.write_zero(0, 4096, 4096)
        w.write_data(0, 8192, 4096, Compression.NONE, b"b" * 4096)
        w.write_data(0, 0, 4096, Compression.NONE, b"a" * 4096)

    data = write_archive(build)
    parts = split(data)
    index = parts.records[parts.find(RecordType.INDEX)]
    assert index.flags == FLAG_OPTIONAL
    by_pos = {r.pos: r for r in parts.records}
    entries = decode_index(index.body)
    assert [(e.rtype, e.offset) for e in entries] == [
        (RecordType.ZERO, 4096), (RecordType.DATA, 8192), (RecordType.DATA, 0),
    ]
    for e in entries:
        rec = by_pos[e.pos]
        assert rec.rtype == e.rtype
        if e.rtype == RecordType.DATA:
            assert Chunk.decode(rec.body, "x").offset == e.offset
        else:
            assert Zero.decode(rec.body) == Zero(e.device, e.offset, e.length)
    footer = Footer.decode(data[-48:], len(data) - 48)
    assert footer.index_pos == index.pos
    assert footer.end_pos == parts.records[-1].pos
    assert footer.archive_len == len(data)


def test_long_texts_the_writer_accepts_are_read_back() -> None:
    # Regression: the reader used to refuse tool_version, checkpoint and props keys over
    # 255 bytes, which the writer wrote without complaint: a backup that cannot be read.
    header = Header(uuid=uuid.UUID(int=9), created_ns=0, tool_version="v" * 300,
                    kind=Kind.INCREMENTAL, parent_uuid=uuid.UUID(int=8),
                    checkpoint="bitmap-" + "c" * 1016, props={"k" * 300: "v" * 70000})

    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 0, {"p" * 65535: "x"})

    c = read_archive(write_archive(build, header))
    assert c.header == header
    assert c.devices == {"vda": 0}


def test_archive_without_data_has_no_index() -> None:
    def build(w: ArchiveWriter) -> None:
        w.add_device("empty", 0)

    data = write_archive(build)
    assert Footer.decode(data[-48:], len(data) - 48).index_pos == NO_INDEX
    assert read_archive(data).devices == {"empty": 0}


# --- the worked example of docs/FORMAT.md -----------------------------------------------

TINY = make_tiny.TINY_PATH

# Where docs/FORMAT.md says each record of tiny.arc starts, and its body length.
TINY_LAYOUT = [
    (RecordType.HEADER, 0x0010, 64),
    (RecordType.DEVICE, 0x0078, 19),
    (RecordType.CONFIG, 0x00B3, 21),
    (RecordType.CONFIG_DATA, 0x00F0, 42),
    (RecordType.DATA, 0x0142, 4120),
    (RecordType.ZERO, 0x1182, 24),
    (RecordType.INDEX, 0x11C2, 64),
    (RecordType.END, 0x122A, 72),
]
TINY_FOOTER_POS = 0x129A
TINY_LEN = 0x12CA


def test_tiny_is_what_make_tiny_builds() -> None:
    assert TINY.read_bytes() == make_tiny.build(), (
        "tests/data/tiny.arc is stale: run tests/data/make_tiny.py and update the "
        "hexdump in docs/FORMAT.md"
    )


def test_tiny_fields_are_what_the_spec_says() -> None:
    data = TINY.read_bytes()
    assert len(data) == TINY_LEN
    c = read_archive(data)
    assert c.header == Header(
        uuid=uuid.UUID("00112233-4455-6677-8899-aabbccddeeff"),
        created_ns=1_700_000_000_000_000_000,
        tool_version="tiny-1",
        kind=Kind.FULL,
    )
    assert c.devices == {"vda": 8192}
    assert c.configs == {"vm.conf": b"cpus=1\nmemory=64M\n"}
    pattern = b"backup-agent tiny.arc: device vda, bytes 0..4096\n"
    assert c.data == {"vda": [(0, pattern + bytes(4096 - len(pattern)))]}
    assert c.zeros == {"vda": [(4096, 4096)]}
    assert c.image("vda") == pattern + bytes(8192 - len(pattern))
    assert (c.end.records, c.end.data_bytes, c.end.zero_bytes, c.end.stored_bytes) == (
        7, 4096, 4096, 4096,
    )
    assert (c.end.devices, c.end.configs) == (1, 1)

    parts = split(data)
    assert [(r.rtype, r.pos, len(r.body)) for r in parts.records] == TINY_LAYOUT
    assert [r.seq for r in parts.records] == list(range(8))
    assert [r.flags for r in parts.records] == [0] * 6 + [FLAG_OPTIONAL, 0]
    assert Footer.decode(parts.tail, TINY_FOOTER_POS) == Footer(0x11C2, 0x122A, TINY_LEN)
    assert Device.decode(parts.records[1].body) == Device(0, "vda", 8192)
    assert Config.decode(parts.records[2].body) == Config(0, "vm.conf", 18)
    assert Chunk.decode(parts.records[3].body, "x") == Chunk(0, Compression.NONE, 0, 18)
    assert Chunk.decode(parts.records[4].body, "x") == Chunk(0, Compression.NONE, 0, 4096)
    assert Zero.decode(parts.records[5].body) == Zero(0, 4096, 4096)
    assert decode_index(parts.records[6].body) == [
        IndexEntry(RecordType.DATA, Compression.NONE, 0, 0, 4096, 0x142),
        IndexEntry(RecordType.ZERO, Compression.NONE, 0, 4096, 4096, 0x1182),
    ]


_XXD_LINE = re.compile(r"^([0-9a-f]{8}): ((?:[0-9a-f]{2,4} )*[0-9a-f]{2,4})  ")


def _bytes_from_hexdump(text: str) -> dict[int, int]:
    """Every byte shown by the ``xxd -a`` dumps in ``text``: position -> value.

    A ``*`` line right after a dump line stands for lines of zero bytes up to the next
    dump line; any other line (prose, fences) ends a dump."""
    out: dict[int, int] = {}
    line_end: int | None = None  # where the previous dump line ended, if it was one
    skip_from: int | None = None
    for line in text.splitlines():
        if line.strip() == "*":
            assert line_end is not None, "a '*' line that follows no dump line"
            skip_from = line_end
            continue
        m = _XXD_LINE.match(line)
        if not m:
            line_end = skip_from = None
            continue
        pos = int(m.group(1), 16)
        raw = bytes.fromhex(m.group(2).replace(" ", ""))
        if skip_from is not None:
            for p in range(skip_from, pos):
                out[p] = 0
            skip_from = None
        for i, b in enumerate(raw):
            assert out.get(pos + i, b) == b, f"the hexdump disagrees with itself at {pos + i}"
            out[pos + i] = b
        line_end = pos + len(raw)
    return out


def test_format_md_hexdump_matches_tiny() -> None:
    """The spec's worked example is the file, byte for byte: it cannot drift."""
    text = FORMAT_MD.read_text(encoding="utf-8")
    shown = _bytes_from_hexdump(text[text.index("## Worked example") :])
    data = TINY.read_bytes()
    missing = sorted(set(range(len(data))) - set(shown))
    assert not missing, f"docs/FORMAT.md does not show bytes {missing[0]}..{missing[-1]}"
    assert max(shown) == len(data) - 1
    wrong = [p for p in range(len(data)) if shown[p] != data[p]]
    assert not wrong, f"docs/FORMAT.md shows a wrong byte at {wrong[0]:#x}"
