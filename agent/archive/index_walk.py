"""Reading an archive's trailing index in fixed-size pieces, checking every entry.

A seekable reader (``info``, random access) trusts the index instead of scanning the data,
so everything the index says that the streaming reader would refuse is refused here too,
without ever holding the index: the INDEX records are read 1 MiB at a time, each piece's
entries checked and forgotten. Memory is a few counters per device, whatever the archive.

What holds for the index of every valid archive (docs/FORMAT.md, "INDEX" and "Reading")::

    data_start                              index_pos                 end_pos  footer
    │ DATA/ZERO records (+ optional ones)   │ INDEX (+ optional) ...   │ END     │
    └ entry 0 is here; entries follow in the order written, each record ending
      before the next begins: positions strictly increase, at least 64 bytes apart

- the INDEX records and whatever optional records sit between them carry consecutive
  ``seq``, END's is the next one, and they tile ``index_pos..end_pos`` exactly;
- every entry is DATA or ZERO, of a declared device, inside it, of a valid length;
- the entries' DATA and ZERO lengths add up to END's totals, and per device to at most
  its size (exactly its size for a FULL archive: covered once, nothing missing);
- there are no more entries than records between ``data_start`` and ``index_pos``; when
  there are exactly as many (no optional records: every archive this agent writes), the
  records are back to back, so each DATA record's size is the distance to the next
  entry, and those sizes add up to END's ``stored_bytes``.

Each INDEX record's digest is checked before anything it says is reported: a problem
found in a piece is kept and raised only once the record's digest matched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import blake3

from agent.archive.format import (
    DIGEST_SIZE,
    FLAG_OPTIONAL,
    FRAME,
    INDEX_ENTRY,
    KNOWN_FLAGS,
    MAX_DATA_LENGTH,
    Compression,
    Device,
    Frame,
    RecordType,
    unpack_frame,
)
from agent.errors import ArchiveError, UnsupportedArchive

if TYPE_CHECKING:  # cryptography is imported only for encrypted archives
    from agent.archive.crypto import RecordSealer

#: Entries read and checked at a time: 1 MiB (a whole number of 32-byte entries).
PIECE = 32768 * INDEX_ENTRY.size
#: Frame header, the fixed part of a DATA or ZERO body, digest: the least a record takes.
RECORD_OVERHEAD = FRAME.size + 24 + DIGEST_SIZE
_DATA, _ZERO = RecordType.DATA & 0xFF, RecordType.ZERO & 0xFF
_COMPRESSIONS = frozenset(Compression)
_KNOWN = frozenset(RecordType)

#: Called with each piece of raw entries (a whole number of them), before the record's
#: digest is known: a collector keeps nothing of a walk that raised.
Collect = Callable[[memoryview], None]


def frame_at(f: BinaryIO, pos: int, end: int) -> Frame:
    """The checked frame header of the record at ``pos``, which must end by ``end``."""
    f.seek(pos)
    head = f.read(FRAME.size)
    if len(head) != FRAME.size:
        raise ArchiveError(f"the archive is truncated at byte {pos}")
    fr = unpack_frame(head, pos)
    if fr.flags & ~KNOWN_FLAGS:
        raise UnsupportedArchive(f"record at byte {pos} has unknown flags {fr.flags:#x}")
    if pos + FRAME.size + fr.body_len + DIGEST_SIZE > end:
        raise ArchiveError(f"the record at byte {pos} runs past byte {end}")
    return fr


@dataclass
class IndexFacts:
    """What a walk over the index found (only counters: the entries are gone)."""

    entries: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    stored_if_back_to_back: int = 0  # END's stored_bytes, if no optional records intervene
    first_seq: int = -1  # seq of the first INDEX record
    first: tuple[int, int, int, int, int] | None = None  # (type, device, offset, length, pos)
    last: tuple[int, int, int, int, int] | None = None
    by_device: list[int] = field(default_factory=list)  # bytes listed per device id


class _Entries:
    """Checks entries piece by piece; remembers the first problem instead of raising, so
    that the record's digest is checked first (damage is reported as damage)."""

    def __init__(self, devices: Sequence[Device], data_start: int, index_pos: int,
                 tag: int = 0) -> None:
        # ``tag``: bytes sealing adds to every record's body (0 for a plain archive), not
        # counted in END's stored_bytes.
        self.overhead = RECORD_OVERHEAD + tag
        self.sizes = [d.size for d in devices]
        self.index_pos = index_pos
        self.next_min = data_start  # where the next entry's record may start, at the least
        self.facts = IndexFacts(by_device=[0] * len(devices))
        self._prev_data_pos = -1  # position of the last entry if it was DATA
        self._data_start = data_start

    def feed(self, piece: memoryview) -> str | None:
        facts, sizes = self.facts, self.sizes
        by_device = facts.by_device
        n = facts.entries
        for rt, comp, _r, dev, off, ln, pos in INDEX_ENTRY.iter_unpack(piece):
            if rt == _DATA:
                if comp not in _COMPRESSIONS:
                    return f"index entry {n} has unknown compression {comp}"
                if not 0 < ln <= MAX_DATA_LENGTH:
                    return f"index entry {n} has a data length of {ln}"
                least = RECORD_OVERHEAD + 1
                facts.data_bytes += ln
            elif rt == _ZERO:
                if comp != 0 or ln == 0:
                    return f"index entry {n} is not a valid zero range"
                least = RECORD_OVERHEAD
                facts.zero_bytes += ln
            else:
                return f"index entry {n} has an unknown record type {rt}"
            if dev >= len(sizes):
                return f"index entry {n} names device {dev}, which was never declared"
            if off + ln > sizes[dev]:
                return (f"index entry {n} covers {off}..{off + ln} of device {dev}, past its "
                        f"end ({sizes[dev]})")
            if n == 0 and pos != self._data_start:
                return f"index entry 0 is at byte {pos}, not where the data starts"
            if pos < self.next_min:
                return (f"index entry {n} is at byte {pos}, inside the record before it or "
                        "out of the order written")
            if self._prev_data_pos >= 0:
                facts.stored_if_back_to_back += pos - self._prev_data_pos - self.overhead
            self._prev_data_pos = pos if rt == _DATA else -1
            self.next_min = pos + least
            by_device[dev] += ln
            facts.last = (rt, dev, off, ln, pos)
            if n == 0:
                facts.first = facts.last
            n += 1
            facts.entries = n
        return None

    def finish(self) -> str | None:
        if self.next_min > self.index_pos:
            return "the index's last entry is not before the index"
        if self._prev_data_pos >= 0:
            self.facts.stored_if_back_to_back += (self.index_pos - self._prev_data_pos
                                                  - self.overhead)
        return None


def _feed_whole(view: memoryview, pos: int,
                feed: Callable[[memoryview], str | None]) -> str | None:
    """Hand ``feed`` the entries of one piece; the first problem, or None."""
    whole = len(view) - len(view) % INDEX_ENTRY.size
    problem = feed(view[:whole])
    if problem is None and whole != len(view):
        problem = f"index record at byte {pos} has a partial entry"
    return problem


def checked_body(f: BinaryIO, pos: int, fr: Frame, what: str,
                 sealer: RecordSealer | None = None) -> bytes | memoryview:
    """The body of the record at ``pos`` (whose frame ``fr`` was read), read whole (a frame
    may claim at most MAX_BODY), its digest checked, then opened with ``sealer`` (an
    encrypted archive's) if there is one."""
    f.seek(pos + FRAME.size)
    body = f.read(fr.body_len)
    dig = f.read(DIGEST_SIZE)
    if len(body) != fr.body_len or len(dig) != DIGEST_SIZE:
        raise ArchiveError(f"the archive is truncated inside the record at byte {pos}")
    if blake3.blake3(body).digest(DIGEST_SIZE) != dig:
        raise ArchiveError(f"{what} at byte {pos} fails its checksum")
    return body if sealer is None else sealer.open(fr.rtype, fr.flags, fr.seq, body, pos)


def sealed_body(f: BinaryIO, pos: int, fr: Frame,
                 feed: Callable[[memoryview], str | None] | None, what: str,
                 sealer: RecordSealer) -> None:
    """A sealed record's body is read whole (an INDEX record this agent writes holds 2 MiB
    of entries), its digest checked, then opened: the entries are handed on only once the
    record authenticated."""
    plain = memoryview(checked_body(f, pos, fr, what, sealer))
    if feed is None:
        return
    for at in range(0, len(plain), PIECE):
        problem = _feed_whole(plain[at:at + PIECE], pos, feed)
        if problem is not None:
            raise ArchiveError(problem)


def _body(f: BinaryIO, pos: int, fr: Frame, feed: Callable[[memoryview], str | None] | None,
          what: str, sealer: RecordSealer | None = None) -> None:
    """Read the body of the record at ``pos`` in pieces, hashing it and handing each piece
    to ``feed``; check the digest, then raise the first problem ``feed`` found."""
    if sealer is not None:
        sealed_body(f, pos, fr, feed, what, sealer)
        return
    h = blake3.blake3()
    problem = None
    left = fr.body_len
    buf = bytearray(min(PIECE, left))
    f.seek(pos + FRAME.size)
    while left:
        view = memoryview(buf)[: min(PIECE, left)]
        if f.readinto(view) != len(view):  # type: ignore[attr-defined]
            raise ArchiveError(f"the archive is truncated inside the record at byte {pos}")
        h.update(view)
        left -= len(view)
        if feed is not None and problem is None:
            problem = _feed_whole(view, pos, feed)
    if f.read(DIGEST_SIZE) != h.digest(DIGEST_SIZE):
        raise ArchiveError(f"{what} at byte {pos} fails its checksum")
    if problem is not None:
        raise ArchiveError(problem)


def walk_index(f: BinaryIO, index_pos: int, end_pos: int, end_seq: int,
               devices: Sequence[Device], data_start: int,
               collect: Collect | None = None,
               sealer: RecordSealer | None = None) -> IndexFacts:
    """Read and check the INDEX records from ``index_pos`` up to the END record at
    ``end_pos`` (whose ``seq`` is ``end_seq``); ``collect`` sees every piece of entries.
    ``sealer``: an encrypted archive's, which opens each record after its digest."""
    entries = _Entries(devices, data_start, index_pos, 0 if sealer is None else sealer.TAG)

    def feed(piece: memoryview) -> str | None:
        problem = entries.feed(piece)
        if problem is None and collect is not None:
            collect(piece)
        return problem

    pos, seq = index_pos, -1
    while pos < end_pos:
        fr = frame_at(f, pos, end_pos)
        if seq == -1:
            if fr.rtype != RecordType.INDEX:
                raise ArchiveError(f"the footer points at byte {pos}, not an index record")
            entries.facts.first_seq = fr.seq
        elif fr.seq != seq:
            raise ArchiveError(f"record at byte {pos} has sequence number {fr.seq}, "
                               f"expected {seq}")
        seq = fr.seq + 1
        if fr.rtype == RecordType.INDEX:
            _body(f, pos, fr, feed, "index record", sealer)
        elif fr.rtype not in _KNOWN and fr.flags & FLAG_OPTIONAL:
            _body(f, pos, fr, None, f"optional record of type {fr.rtype:#06x}", sealer)
        elif fr.rtype in _KNOWN:
            raise ArchiveError(f"{RecordType(fr.rtype).name.lower()} record at byte {pos} "
                               "comes after the index")
        else:
            raise UnsupportedArchive(f"record type {fr.rtype:#06x} at byte {pos} is "
                                     "required to read this archive but unknown to this "
                                     "backup-agent: a newer version wrote it")
        pos += FRAME.size + fr.body_len + DIGEST_SIZE
    if seq != end_seq:
        raise ArchiveError(f"the end record has sequence number {end_seq}, expected {seq}")
    problem = entries.finish()
    if problem is not None:
        raise ArchiveError(problem)
    return entries.facts
