"""Random access to an archive file through its trailing index.

A reader that can seek finds the 48-byte footer at the end of the file (after
any zero padding a tape left), reads the END record it points to and walks the
INDEX records (agent/archive/index_walk.py), checking them in fixed-size pieces
without keeping them: opening costs the same small memory whatever the archive.
Only :meth:`IndexedArchive.read` needs the entries by device offset, and builds a
packed table of them (24 bytes an entry) the first time it is called.

Everything an archive says at its end is checked before it is believed: the footer
(its own length, where END is), END (its digest, its ``seq``), the index (see
index_walk; and that no two of its ranges overlap, overlaps.py), and that both ends
belong to one archive. Only ``verify`` reads the records themselves.
"""

from __future__ import annotations

import bisect
import heapq
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from agent.archive import codec
from agent.archive.format import (
    CHUNK_FIXED,
    DIGEST_SIZE,
    FOOTER,
    INDEX_ENTRY,
    NO_INDEX,
    PREAMBLE,
    Chunk,
    Config,
    Device,
    End,
    Footer,
    Header,
    Kind,
    RecordType,
    Zero,
)
from agent.archive.index_walk import (
    Collect,
    IndexFacts,
    checked_body,
    frame_at,
    walk_index,
)
from agent.archive.overlaps import ExactCover, NoOverlap
from agent.archive.reader import ArchiveReader
from agent.errors import ArchiveError

if TYPE_CHECKING:  # cryptography is imported only for encrypted archives
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from agent.archive.crypto import RecordSealer

_TAIL_PROBE = 1 << 20


@dataclass(frozen=True)
class _Record:
    rtype: int
    flags: int
    seq: int
    body: bytes | memoryview


def _record_at(f: BinaryIO, pos: int, end: int, sealer: RecordSealer | None = None) -> _Record:
    """The record at ``pos`` (ending by ``end``), its digest checked, and opened with
    ``sealer`` (an encrypted archive's). Only for records whose body the caller needs whole
    (END, one DATA record): at most MAX_BODY."""
    fr = frame_at(f, pos, end)
    return _Record(fr.rtype, fr.flags, fr.seq, checked_body(f, pos, fr, "record", sealer))


def _find_footer(f: BinaryIO, size: int) -> tuple[Footer, int]:
    """The footer and its position, skipping zero padding after it."""
    if size < FOOTER.size:
        raise ArchiveError("the archive is too short to hold a footer")
    f.seek(size - FOOTER.size)
    last = f.read(FOOTER.size)
    try:
        footer = Footer.decode(last, size - FOOTER.size)
    except ArchiveError:
        if last[-1:] != b"\0":  # padding ends in zeros, though shorter ones hold footer bytes
            raise
    else:
        if footer.archive_len != size:
            raise ArchiveError(f"the footer at byte {size - FOOTER.size} says the archive is "
                               f"{footer.archive_len} bytes long, not {size}")
        return footer, size - FOOTER.size
    # Zero padding: find the last non-zero byte, then the footer ends a little after
    # it (its digest may itself end in zero bytes).
    end = size
    while end > 0:
        start = max(0, end - _TAIL_PROBE)
        f.seek(start)
        chunk = f.read(end - start).rstrip(b"\0")
        if chunk:
            last_nonzero = start + len(chunk)
            break
        end = start
    else:
        raise ArchiveError("the archive holds nothing but zeros")
    for footer_end in range(last_nonzero, min(last_nonzero + DIGEST_SIZE, size) + 1):
        pos = footer_end - FOOTER.size
        if pos < 0:
            continue
        f.seek(pos)
        with_zeros = f.read(FOOTER.size)
        try:
            footer = Footer.decode(with_zeros, pos)
        except ArchiveError:
            continue
        if footer.archive_len == footer_end:
            return footer, pos
    raise ArchiveError("no footer found at the end of the archive: it is incomplete")




@dataclass(frozen=True)
class Seal:
    """What the end of an archive file says, checked: the footer, where it is, and END."""

    footer: Footer
    footer_pos: int
    end: End | None  # None: an encrypted archive's, sealed (a key is needed to read it)
    end_seq: int


#: Where the HEADER's ``encryption`` byte is: preamble, frame header, 41 bytes into the body.
_ENCRYPTION_AT = PREAMBLE.size + 24 + 41


def is_encrypted(f: BinaryIO) -> bool:
    """Whether HEADER says the records are sealed (docs/FORMAT.md, "Encryption"): its
    digest is checked when the archive is read, this is only which way to read it."""
    f.seek(0)
    head = f.read(_ENCRYPTION_AT + 1)
    return (len(head) > _ENCRYPTION_AT and head[PREAMBLE.size:PREAMBLE.size + 4] == b"BREC"
            and head[_ENCRYPTION_AT] != 0)


def read_seal(f: BinaryIO, sealer: RecordSealer | None = None) -> Seal:
    """The footer and END record of the archive file ``f``: proof that a writer finished
    it (only ``verify`` proves that nothing before was changed). An encrypted archive's
    END is opened with ``sealer``; without one, only where it is is known."""
    sealed = is_encrypted(f)
    size = f.seek(0, os.SEEK_END)  # a file's size, or an object's (agent/s3/objects.py)
    footer, footer_pos = _find_footer(f, size)
    if not PREAMBLE.size < footer.end_pos < footer_pos:
        raise ArchiveError(f"the footer at byte {footer_pos} points at byte "
                           f"{footer.end_pos} for the end record")
    rec = _record_at(f, footer.end_pos, footer_pos)
    if rec.rtype != RecordType.END:
        raise ArchiveError(f"the footer points at byte {footer.end_pos}, not an end record")
    if f.tell() != footer_pos:
        raise ArchiveError(f"the end record at byte {footer.end_pos} is not followed by "
                           "the footer")
    body = rec.body
    if sealed:
        if sealer is None:  # where END is, and that the footer follows, is all
            return Seal(footer, footer_pos, None, rec.seq)
        body = sealer.open(rec.rtype, rec.flags, rec.seq, body, footer.end_pos)
    end = End.decode(bytes(body))
    if end.records != rec.seq:
        raise ArchiveError(f"end record at byte {footer.end_pos} does not seal the archive: "
                           f"{rec.seq} records present, the seal says {end.records}")
    if footer.index_pos != NO_INDEX and not PREAMBLE.size < footer.index_pos < footer.end_pos:
        raise ArchiveError(f"the footer points at byte {footer.index_pos} for the index")
    return Seal(footer, footer_pos, end, rec.seq)


def seal_of(path: str) -> Seal:
    """:func:`read_seal` of the file ``path`` (OSError if it cannot be opened)."""
    with open(path, "rb") as f:
        return read_seal(f)


# One table entry: device offset, length, and the record's position with its type in the
# top bit. Big-endian, so that comparing packed entries as bytes orders them by offset.
_SLOT = struct.Struct(">QQQ")
_DATA_BIT = 1 << 63


def _slots(run: bytes) -> Iterator[bytes]:
    view = memoryview(run)
    for k in range(0, len(run), _SLOT.size):
        yield bytes(view[k : k + _SLOT.size])


class _Offsets:
    """The offsets of a packed table, as a sequence for :mod:`bisect`."""

    def __init__(self, table: bytes | bytearray) -> None:
        self._table = table

    def __len__(self) -> int:
        return len(self._table) // _SLOT.size

    def __getitem__(self, i: int) -> int:
        return int.from_bytes(self._table[i * _SLOT.size : i * _SLOT.size + 8], "big")


class _Lookup:
    """Each device's index entries sorted by device offset, packed in one bytes object
    (24 bytes an entry, no object per entry), for bisection. Building it sorts the entries,
    which also shows whether any two of a device's ranges overlap: a valid archive's never
    do (verify refuses them), so neither does this."""

    def __init__(self, tables: dict[int, bytes | bytearray], names: dict[int, str]) -> None:
        self._tables = tables
        for dev, table in tables.items():
            end = 0
            for off, ln, _ in _SLOT.iter_unpack(table):
                if off < end:
                    raise ArchiveError(f"device {names[dev]!r}: the index lists overlapping "
                                       f"ranges at device offset {off}: the index is damaged")
                end = off + ln

    @classmethod
    def build(cls, walk: Callable[[Collect], IndexFacts], names: dict[int, str]) -> _Lookup:
        """Sort the entries ``walk`` hands out by device and offset, never holding more than
        one piece of them as Python objects: each piece is sorted into packed runs (one per
        device), and the runs of a device are merged into its table."""
        runs: dict[int, list[bytes]] = {}

        def collect(piece: memoryview) -> None:
            mine: dict[int, list[bytes]] = {}
            for rt, _c, _r, dev, off, ln, pos in INDEX_ENTRY.iter_unpack(piece):
                bit = _DATA_BIT if rt == RecordType.DATA & 0xFF else 0
                mine.setdefault(dev, []).append(_SLOT.pack(off, ln, pos | bit))
            for dev, slots in mine.items():
                slots.sort()
                runs.setdefault(dev, []).append(b"".join(slots))

        walk(collect)
        tables: dict[int, bytes | bytearray] = {}
        for dev in list(runs):
            parts = runs.pop(dev)
            if len(parts) == 1:
                tables[dev] = parts[0]
                continue
            table = bytearray()
            for slot in heapq.merge(*(_slots(p) for p in parts)):
                table += slot
            tables[dev] = table  # no copy: it is never changed again
        return cls(tables, names)

    def entries(self, dev: int, offset: int, length: int) -> list[tuple[int, int, int, bool]]:
        """(offset, length, pos, is_data) of the entries of ``dev`` that meet
        ``offset..offset+length``, in offset order."""
        table = self._tables.get(dev, b"")
        i = max(0, bisect.bisect_right(_Offsets(table), offset) - 1)
        out = []
        for k in range(i * _SLOT.size, len(table), _SLOT.size):
            off, ln, pos = _SLOT.unpack_from(table, k)
            if off >= offset + length:
                break
            if off + ln > offset:
                out.append((off, ln, pos & ~_DATA_BIT, bool(pos & _DATA_BIT)))
        return out


def open_random(path: str) -> BinaryIO:
    """``path`` opened for random access: a file, or an ``s3://`` object read by ranged
    GETs (OSError or ArchiveError if it cannot be opened)."""
    if path.startswith("s3://"):  # imported here: boto3 is heavy
        from agent.s3.objects import RangedObject

        return RangedObject(path)  # type: ignore[return-value]
    return open(path, "rb")


class IndexedArchive:
    """An archive file opened for random access: its header, devices and configs (read
    from the start), its seal (END, from the end) and its index, all checked."""

    def __init__(self, path: str, keys: Sequence[X25519PrivateKey] = (),
                 label: str | None = None, *, f: BinaryIO | None = None,
                 also: Callable[[list[Device]], Collect | None] | None = None,
                 index: bool = True) -> None:
        """``keys``: for an encrypted archive (without one that is a recipient it raises
        :class:`agent.archive.crypto.KeyRequired`, which holds the clear header). ``f``:
        ``path`` already open (the caller's to close), so that what is checked here is what
        the caller goes on to read. ``also``: given the devices, a second collector of the
        index's entries (or None), fed by the checking walk as it goes: a caller that needs
        the entries walks the index once (if the walk fails, discard what it collected).
        ``index=False``: check the two ends only, not the index (``serve`` before it starts
        nbdkit, which walks and checks it): :attr:`has_index` says whether there is one,
        and the archive cannot be read at random."""
        self.path = path
        self._owned = f is None
        self._f: BinaryIO = open_random(path) if f is None else f
        self._lookup: _Lookup | None = None
        self.sealer: RecordSealer | None = None
        self._also = also
        self._walk_index = index
        try:
            self._open(keys, label or path)
        except BaseException:
            self.close()
            raise

    def _open(self, keys: Sequence[X25519PrivateKey], label: str) -> None:
        f = self._f
        head = None
        if is_encrypted(f):  # the key first: END and the index are sealed
            f.seek(0)
            head = ArchiveReader(f, keep_configs=False, keys=keys, label=label)
            self.sealer = head.sealer
        seal = read_seal(f, self.sealer)
        if seal.end is None:
            raise ArchiveError("internal: an encrypted archive's seal was not opened")
        self._seal = seal
        self.end: End = seal.end
        self.archive_len = seal.footer.archive_len
        if head is None:
            f.seek(0)
            head = ArchiveReader(f, keep_configs=False)
        self.header: Header = head.header
        self.devices: list[Device] = head.devices
        self.configs: list[Config] = head.configs
        if head.data_start is None:  # only after records() was iterated: not here
            raise ArchiveError("internal: the reader went past the metadata")
        self._data_start = head.data_start
        try:
            self._check_end_matches_start()
            self.has_index = seal.footer.index_pos != NO_INDEX
            self.index: IndexFacts | None = None
            if self.has_index and self._walk_index:
                self.index = self._walk_checking_ranges()
        except ArchiveError as e:
            raise self._mismatch(str(e)) from e

    def _walk_checking_ranges(self) -> IndexFacts:
        """Walk the index, checking it and that no two of its ranges overlap (overlaps.py:
        a FULL archive's ranges must cover its devices exactly, in constant memory; other
        kinds' are sorted on disk)."""
        full = self.header.kind == Kind.FULL
        ranges = ExactCover(self.devices) if full else NoOverlap()
        also = self._also(self.devices) if self._also is not None else None
        collect = ranges.collect
        if also is not None:
            def collect(piece: memoryview) -> None:
                ranges.collect(piece)
                also(piece)
        try:
            facts = self._walk(collect)
            self._check_index(facts)
            problem = ranges.finish([d.name for d in self.devices])
        finally:
            if isinstance(ranges, NoOverlap):
                ranges.close()
        if problem is not None:
            raise ArchiveError(problem)
        return facts

    def _walk(self, collect: Collect | None) -> IndexFacts:
        s = self._seal
        return walk_index(self._f, s.footer.index_pos, s.footer.end_pos, s.end_seq,
                          self.devices, self._data_start, collect, self.sealer)

    def _check_end_matches_start(self) -> None:
        """The start (header, devices) and the end (seal, index) were found at the two ends
        of the file: make sure they are one archive. A file that held an older, longer
        archive and was overwritten without truncation (a reused tape image) has the new
        archive's start and, after the padding, the old one's end. Only a full read
        (``verify``) proves the whole; these checks catch such a mix cheaply."""
        end, devices = self.end, self.devices
        problems = []
        if (end.devices, end.configs) != (len(devices), len(self.configs)):
            problems.append("its seal counts other devices or configs")
        if self.header.kind == Kind.FULL and end.data_bytes + end.zero_bytes != sum(
                d.size for d in devices):
            problems.append("its seal covers another size than its devices")
        if self._seal.footer.index_pos != NO_INDEX and self._seal.footer.index_pos < (
                self._data_start):
            problems.append("its index starts before its data")
        if problems:
            raise ArchiveError("; ".join(problems))

    def _check_index(self, facts: IndexFacts) -> None:
        """What the index says against the seal and the devices (index_walk has checked
        every entry on its own)."""
        end, f = self.end, self._f
        problems = []
        if (facts.data_bytes, facts.zero_bytes) != (end.data_bytes, end.zero_bytes):
            problems.append("its index and its seal count other data or zero bytes")
        data_start_seq = frame_at(f, self._data_start, self._seal.footer_pos).seq
        room = facts.first_seq - data_start_seq  # records between the metadata and the index
        if facts.entries > room:
            problems.append(f"its index lists {facts.entries} records, there is room for "
                            f"{room}")
        elif facts.entries == room and facts.stored_if_back_to_back != end.stored_bytes:
            problems.append("its index and its seal count other stored bytes")
        full = self.header.kind == Kind.FULL
        for dev, listed in zip(self.devices, facts.by_device, strict=True):
            if listed > dev.size or (full and listed != dev.size):
                problems.append(f"its index lists {listed} bytes of device {dev.name!r} "
                                f"({dev.size} bytes)")
                break
        if problems:
            raise ArchiveError("; ".join(problems))
        # The first and the last entry name real records: the cheap check that the index
        # belongs to the data before it.
        for which, entry, seq in (("first", facts.first, data_start_seq),
                                  ("last", facts.last, facts.first_seq - 1)):
            if entry is None:
                continue
            rtype, device, offset, length, pos = entry
            found = self._describe_record(pos, seq if facts.entries == room else None)
            if found != (rtype, device, offset, length):
                raise ArchiveError(f"its {which} data record is not the one its index names")

    def _describe_record(self, pos: int, seq: int | None) -> tuple[int, int, int, int]:
        """(type low byte, device, offset, length) of the DATA or ZERO record at ``pos``."""
        rec = _record_at(self._f, pos, self._seal.footer_pos, self.sealer)
        if seq is not None and rec.seq != seq:
            return (-1, -1, -1, -1)
        if rec.rtype == RecordType.DATA:
            ch = Chunk.decode(rec.body, f"data record at byte {pos}")
            return (rec.rtype & 0xFF, ch.target, ch.offset, ch.length)
        if rec.rtype == RecordType.ZERO:
            z = Zero.decode(rec.body)
            return (rec.rtype & 0xFF, z.device, z.offset, z.length)
        return (-1, -1, -1, -1)

    def _mismatch(self, why: str) -> ArchiveError:
        return ArchiveError(
            f"{self.path}: the end of this file does not belong to the archive at its start, "
            f"or is damaged ({why}): is an older archive left behind it? `backup-agent "
            "verify` reads it from the start")

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise ArchiveError(f"no device named {name!r} in the archive")

    def _entries(self) -> _Lookup:
        if self._lookup is None:
            if not self.has_index:
                raise ArchiveError(f"{self.path}: the archive has no index, so it cannot be "
                                   "read at random: restore it instead")
            if self.index is None:
                raise ArchiveError("internal: the archive was opened without its index")
            names = {d.id: d.name for d in self.devices}
            try:
                self._lookup = _Lookup.build(self._walk, names)
            except ArchiveError as e:
                raise self._mismatch(str(e)) from e
        return self._lookup

    def read(self, name: str, offset: int, length: int) -> bytes:
        """Device bytes [offset, offset+length), from the records that hold them."""
        dev = self.device(name)
        if offset < 0 or length < 0 or offset + length > dev.size:
            raise ArchiveError(f"device {name!r}: range {offset}+{length} is outside the device")
        out = bytearray(length)  # ranges no record covers read as zeros (incrementals)
        for e_off, e_len, pos, is_data in self._entries().entries(dev.id, offset, length):
            if not is_data:
                continue
            lo, hi = max(offset, e_off), min(offset + length, e_off + e_len)
            rec = _record_at(self._f, pos, self._seal.footer_pos, self.sealer)
            what = f"data record at byte {pos}"
            if rec.rtype != RecordType.DATA:
                raise ArchiveError(f"the index entry for byte {pos} does not match the "
                                   "record there: the index is damaged")
            ch = Chunk.decode(rec.body, what)
            if (ch.target, ch.offset, ch.length) != (dev.id, e_off, e_len):
                raise ArchiveError(f"the index entry for byte {pos} does not match the "
                                   "record there: the index is damaged")
            data = codec.decompress(ch.compression, memoryview(rec.body)[CHUNK_FIXED:],
                                    ch.length, what)
            out[lo - offset : hi - offset] = memoryview(data)[lo - e_off : hi - e_off]
        return bytes(out)

    def close(self) -> None:
        if self._owned:
            self._f.close()

    def __enter__(self) -> IndexedArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
