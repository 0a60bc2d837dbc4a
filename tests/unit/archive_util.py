"""Helpers for the archive unit tests: write archives, read them back, take them apart
into records and put them together again (re-framed, optionally re-sealed).

The re-framing helpers build malformed archives whose *only* defect is the one a test
is about: frame CRCs, body digests, the END seal and the footer are recomputed unless
the test asks to keep the original ones.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import zstandard

from agent.archive.format import (
    CHUNK_FIXED,
    FRAME,
    INDEX_ENTRY,
    NO_INDEX,
    PREAMBLE,
    Chain,
    Compression,
    End,
    Footer,
    Header,
    RecordType,
    digest,
    pack_frame,
    pack_preamble,
    unpack_frame,
)
from agent.archive.output import SequentialOutput
from agent.archive.reader import ArchiveReader, DataRecord
from agent.archive.writer import ArchiveWriter

_CHUNK = struct.Struct("<IBBHQII")  # the fixed part of DATA and CONFIG_DATA bodies
_ZERO = struct.Struct("<IIQQ")
HEADER = Header(uuid=uuid.UUID(int=0x1234), created_ns=1_000, tool_version="unit-test")


def write_archive(build: Callable[[ArchiveWriter], None], header: Header = HEADER) -> bytes:
    """Run ``build`` on a fresh writer over a real descriptor, finish, return the bytes."""
    with tempfile.TemporaryFile() as f:
        w = ArchiveWriter(SequentialOutput(f.fileno(), "test"), header)
        build(w)
        w.finish()
        f.seek(0)
        return f.read()


@dataclass
class Contents:
    """Everything a reader hands out, in a form that compares with ``==``."""

    header: Header
    devices: dict[str, int]  # name -> size
    configs: dict[str, bytes]
    data: dict[str, list[tuple[int, bytes]]]  # name -> sorted (offset, bytes)
    zeros: dict[str, list[tuple[int, int]]]  # name -> sorted (offset, length)
    end: End

    def image(self, name: str) -> bytes:
        """The device as restore would write it (ZERO ranges and holes as zero bytes)."""
        out = bytearray(self.devices[name])
        for off, chunk in self.data[name]:
            out[off : off + len(chunk)] = chunk
        return bytes(out)


def read_archive(data: bytes) -> Contents:
    """Read ``data`` the way every consumer must: exhaust records(), call data() on each."""
    r = ArchiveReader(io.BytesIO(data))
    chunks: dict[str, list[tuple[int, bytes]]] = {d.name: [] for d in r.devices}
    zeros: dict[str, list[tuple[int, int]]] = {d.name: [] for d in r.devices}
    for rec in r.records():
        if isinstance(rec, DataRecord):
            chunks[rec.device.name].append((rec.offset, bytes(rec.data())))
        else:
            zeros[rec.device.name].append((rec.offset, rec.length))
    assert r.end is not None
    return Contents(
        header=r.header,
        devices={d.name: d.size for d in r.devices},
        configs={c.name: r.config(c.name) for c in r.configs},
        data={k: sorted(v) for k, v in chunks.items()},
        zeros={k: sorted(v) for k, v in zeros.items()},
        end=r.end,
    )


# --- taking archives apart --------------------------------------------------------------


@dataclass
class Rec:
    """One record as :func:`assemble` will frame it.

    ``seq`` None means "its place in the archive"; ``digest`` None means "the digest of
    ``body``" (set it to keep a stale or wrong digest); ``pos`` is where :func:`split`
    found the record, for the tests' expected messages.
    """

    rtype: int
    body: bytes
    flags: int = 0
    seq: int | None = None
    digest: bytes | None = None
    pos: int = -1


@dataclass
class Parts:
    preamble: bytes
    records: list[Rec]
    tail: bytes  # footer and padding, as found

    def find(self, rtype: RecordType, nth: int = 0) -> int:
        """Index in ``records`` of the ``nth`` record of type ``rtype``."""
        hits = [i for i, r in enumerate(self.records) if r.rtype == rtype]
        return hits[nth]


def split(data: bytes) -> Parts:
    """Cut an archive into records, trusting its frames; only the digests are asserted."""
    pos = PREAMBLE.size
    recs: list[Rec] = []
    while True:
        fr = unpack_frame(data[pos : pos + FRAME.size], pos)
        start = pos + FRAME.size
        body = data[start : start + fr.body_len]
        dig = data[start + fr.body_len : start + fr.body_len + 16]
        # Keep the seq; the digest is recomputed on assembly unless a test pins it.
        recs.append(Rec(fr.rtype, body, fr.flags, fr.seq, None, pos))
        assert digest(body) == dig
        pos = start + fr.body_len + 16
        if fr.rtype == RecordType.END:
            break
    return Parts(data[: PREAMBLE.size], recs, data[pos:])


def renumber(recs: Sequence[Rec]) -> list[Rec]:
    """The same records with ``seq`` reset to "place in the archive"."""
    return [replace(r, seq=None) for r in recs]


def assemble(
    recs: Sequence[Rec],
    *,
    preamble: bytes | None = None,
    seal: bool = True,
    footer: bool = True,
    tail: bytes = b"",
    keep_index: bool = False,
) -> bytes:
    """Frame ``recs`` into an archive.

    With ``seal`` the END record is rewritten as an honest writer would have written it
    for exactly these records (count, totals, chained digest) and the INDEX records are
    replaced by one INDEX that lists the DATA and ZERO records at their new positions
    (``keep_index`` keeps the INDEX records as given). Without ``seal`` END and INDEX
    bodies are kept as given. With ``footer`` a matching footer
    is appended; ``tail`` follows (padding or garbage).
    """
    out = bytearray(pack_preamble() if preamble is None else preamble)
    chain = Chain(bytes(out))
    index_pos = NO_INDEX
    end_pos = -1
    index = bytearray()
    data_bytes = zero_bytes = stored = devices = configs = 0
    seen_index = False
    n = 0  # records framed so far
    for r in recs:
        body = r.body
        if r.rtype == RecordType.DEVICE:
            devices += 1
        elif r.rtype == RecordType.CONFIG:
            configs += 1
        elif r.rtype == RecordType.DATA and len(body) >= CHUNK_FIXED:
            # Raw fields, not Chunk.decode: tests frame deliberately invalid bodies too.
            target, comp, _, _, offset, length, _ = _CHUNK.unpack_from(body)
            data_bytes += length
            stored += len(body) - CHUNK_FIXED
            index += INDEX_ENTRY.pack(r.rtype & 0xFF, comp, 0, target, offset, length,
                                      len(out))
        elif r.rtype == RecordType.ZERO and len(body) >= _ZERO.size:
            device, _, offset, length = _ZERO.unpack_from(body)
            zero_bytes += length
            index += INDEX_ENTRY.pack(r.rtype & 0xFF, 0, 0, device, offset, length, len(out))
        elif r.rtype == RecordType.INDEX:
            rebuild = seal and not keep_index
            if rebuild and seen_index:
                continue
            seen_index = True
            if rebuild:
                body = bytes(index)
            if index_pos == NO_INDEX:
                index_pos = len(out)
        elif r.rtype == RecordType.END:
            if seal:
                body = End(n, data_bytes, zero_bytes, stored, devices, configs,
                           chain.value()).encode()
            end_pos = len(out)
        seq = n if r.seq is None else r.seq
        frame = pack_frame(r.rtype, r.flags, seq, len(body))
        dig = digest(body) if r.digest is None else r.digest
        chain.add(frame, dig)
        out += frame + body + dig
        n += 1
    if footer:
        out += Footer(index_pos, end_pos, len(out) + 48).encode()
    return bytes(out + tail)


def flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    """``data`` with the bits of ``mask`` flipped in byte ``pos``."""
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


def reframe(data: bytes, pos: int, **fields: int) -> bytes:
    """``data`` with the frame header at ``pos`` rewritten (``rtype``, ``flags``, ``seq``,
    ``body_len``) and given a correct CRC, so only the changed field is wrong."""
    fr = unpack_frame(data[pos : pos + FRAME.size], pos)
    new = {"rtype": fr.rtype, "flags": fr.flags, "seq": fr.seq, "body_len": fr.body_len}
    new.update(fields)
    frame = pack_frame(new["rtype"], new["flags"], new["seq"], new["body_len"])
    return data[:pos] + frame + data[pos + FRAME.size :]


class Framer:
    """Frames records as the writer does (sequence numbers, frame CRCs, digests, the seal's
    chain) into ``out``, for builders that make large or crafted archives without it."""

    def __init__(self) -> None:
        self.out = bytearray(pack_preamble())
        self.chain = Chain(bytes(self.out))
        self.seq = 0

    def put(self, rtype: int, body: bytes, flags: int = 0) -> int:
        """Append one record; return its position."""
        pos = len(self.out)
        frame = pack_frame(rtype, flags, self.seq, len(body))
        dig = digest(body)
        self.chain.add(frame, dig)
        self.out += frame
        self.out += body
        self.out += dig
        self.seq += 1
        return pos


# --- hostile archives: valid, but built to cost a reader as much as possible ------------


def write_archive_to(path: str | os.PathLike[str], build: Callable[[ArchiveWriter], None],
                     header: Header = HEADER) -> None:
    """:func:`write_archive` into the file ``path`` (large archives stay off the heap)."""
    with open(path, "wb") as f:
        w = ArchiveWriter(SequentialOutput(f.fileno(), "test"), header)
        build(w)
        w.finish()


def tiny_records(n: int, *, gap: int = 4096, zstd: bool = False, zero: bool = False,
                 ) -> Callable[[ArchiveWriter], None]:
    """A builder: one device of ``n * gap`` bytes holding ``n`` records of 1 byte, ``gap``
    bytes apart (DATA records, zstd-compressed with ``zstd``, or ZERO records with
    ``zero``); each gap is one ZERO record, so the archive is a complete full backup.
    About 65 archive bytes per 1-byte record: the most records per archive byte."""
    one = zstandard.ZstdCompressor(write_content_size=True).compress(b"x")

    def build(w: ArchiveWriter) -> None:
        dev = w.add_device("tiny", n * gap).id
        for i in range(n):
            if zero:
                w.write_zero(dev, i * gap, 1)
            elif zstd:
                w.write_data(dev, i * gap, 1, Compression.ZSTD, one)
            else:
                w.write_data(dev, i * gap, 1, Compression.NONE, b"x")
            if gap > 1:
                w.write_zero(dev, i * gap + 1, gap - 1)

    return build


def zero_data(size: int, record: int = 2 * 1024 * 1024) -> Callable[[ArchiveWriter], None]:
    """A builder: one device of ``size`` bytes stored as compressed DATA records of zeros
    (a few dozen archive bytes per record), as a hostile writer would store it."""
    packed = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(record))

    def build(w: ArchiveWriter) -> None:
        dev = w.add_device("zeros", size).id
        for off in range(0, size, record):
            n = min(record, size - off)
            payload = packed if n == record else (
                zstandard.ZstdCompressor(write_content_size=True).compress(bytes(n)))
            w.write_data(dev, off, n, Compression.ZSTD, payload)

    return build


# --- large archives, fast -----------------------------------------------------------------


def many_records(records: int, *, record_len: int = 4096, data_every: int = 1000,
                 header: Header = HEADER) -> bytes:
    """A valid FULL archive of one device ``vda`` split into ``records`` records of
    ``record_len`` bytes, written from the last to the first (so no two ranges merge on
    the way): every ``data_every``-th a stored DATA record of ``i % 251`` bytes, the others
    ZERO records. Framed here directly, without the writer's per-record work, so that a
    test gets hundreds of thousands of records in a second or two."""
    from agent.archive.format import (
        FLAG_OPTIONAL,
        INDEX_ENTRIES_PER_RECORD,
        Device,
        Zero,
    )

    framer = Framer()
    out, record = framer.out, framer.put

    size = records * record_len
    record(RecordType.HEADER, header.encode())
    record(RecordType.DEVICE, Device(0, "vda", size).encode())
    index = bytearray()
    data_bytes = zero_bytes = 0
    for i in range(records):
        offset = size - (i + 1) * record_len
        if data_every and i % data_every == 0:
            body = _CHUNK.pack(0, 0, 0, 0, offset, record_len, 0) + bytes([i % 251]) * record_len
            pos = record(RecordType.DATA, body)
            index += INDEX_ENTRY.pack(RecordType.DATA & 0xFF, 0, 0, 0, offset, record_len, pos)
            data_bytes += record_len
        else:
            pos = record(RecordType.ZERO, Zero(0, offset, record_len).encode())
            index += INDEX_ENTRY.pack(RecordType.ZERO & 0xFF, 0, 0, 0, offset, record_len, pos)
            zero_bytes += record_len
    index_pos = NO_INDEX
    step = INDEX_ENTRIES_PER_RECORD * INDEX_ENTRY.size
    for start in range(0, len(index), step):
        pos = record(RecordType.INDEX, bytes(index[start : start + step]), FLAG_OPTIONAL)
        index_pos = pos if index_pos == NO_INDEX else index_pos
    end = End(framer.seq, data_bytes, zero_bytes, data_bytes, 1, 0, framer.chain.value())
    end_pos = record(RecordType.END, end.encode())
    out += Footer(index_pos, end_pos, len(out) + 48).encode()
    return bytes(out)
