"""Where each byte of a served device comes from: a sorted table of segments.

A segment is a run of device bytes that one source answers: a DATA record (which archive of
the chain, the record's byte position, the device offset the record starts at, so a
piece of a record can be cut out of it, and how far the next record the index lists is, so
the record can be read in one request) or zeros (a ZERO record, at any layer). The table is
kept in a few :mod:`array` columns, about 38 bytes a segment and no Python object for any of
them, so a 1 TiB disk whose holes are a handful of ZERO records costs a handful of segments,
and a dense one one segment per record.

A chain is resolved once, when serving starts, by laying each newer archive's table over the
table resolved so far (:func:`overlay`)::

    full         |D0------|D1------|Z---------------------|D2------|
    incremental           |D7--|             |Z----|
    resolved     |D0------|D7--|D1-|Z--------------------|D2------|
                                 ^ D1 cut: read from D1 at an offset into the record

Only the newer archive's records win where it has any; its gaps (unchanged since its parent)
keep what was there. Adjacent zero segments merge, so block status answers long holes in one
extent.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator
from typing import NamedTuple

from agent.errors import ArchiveError

#: ``pos`` of a segment that reads as zeros.
ZERO = (1 << 64) - 1


class Segment(NamedTuple):
    start: int
    length: int
    pos: int  # the DATA record's byte position in its archive, or ZERO
    rec_off: int  # the device offset where that record starts (0 for zeros)
    layer: int  # which archive of the chain holds the record (0 for zeros)
    room: int = 0  # bytes from pos to the next record the index lists (0: not known)

    @property
    def end(self) -> int:
        return self.start + self.length


class Segments:
    """Segments of one device in ascending, non-overlapping order (gaps allowed)."""

    def __init__(self) -> None:
        self.starts = array("Q")
        self.lengths = array("Q")
        self.pos = array("Q")
        self.rec_off = array("Q")
        self.layer = array("H")
        self.room = array("I")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Segment:
        return Segment(self.starts[i], self.lengths[i], self.pos[i], self.rec_off[i],
                       self.layer[i], self.room[i])

    def __iter__(self) -> Iterator[Segment]:
        for i in range(len(self.starts)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        """Memory held by the columns."""
        return len(self) * (4 * 8 + 2 + 4)

    def add(self, start: int, length: int, pos: int, rec_off: int, layer: int,
            room: int = 0) -> None:
        """Append a segment after the last one; zeros merge with zeros they touch."""
        n = len(self.starts)
        if n:
            last_end = self.starts[n - 1] + self.lengths[n - 1]
            if start < last_end:
                raise ArchiveError(f"the index lists overlapping ranges at device offset "
                                   f"{start}: the index is damaged")
            if pos == ZERO and self.pos[n - 1] == ZERO and start == last_end:
                self.lengths[n - 1] += length
                return
        self.starts.append(start)
        self.lengths.append(length)
        self.pos.append(pos)
        self.rec_off.append(rec_off if pos != ZERO else 0)
        self.layer.append(layer if pos != ZERO else 0)
        self.room.append(room if pos != ZERO else 0)

    def first_at(self, offset: int) -> int:
        """Index of the first segment that ends after ``offset`` (may be ``len(self)``)."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i < 0:
            return 0
        return i if self.starts[i] + self.lengths[i] > offset else i + 1


def overlay(base: Segments, top: Segments) -> Segments:
    """``top`` laid over ``base``: top's segments as they are, base's only where top has
    none (cut to the gaps between top's). Linear in both; neither is changed."""
    out = Segments()
    j, nt = 0, len(top)
    done = 0  # everything before this offset is emitted
    for i in range(len(base)):
        b = base[i]
        cur = max(b.start, done)
        while cur < b.end:
            if j < nt and top.starts[j] <= cur:
                t = top[j]
                out.add(*t)
                done = t.end
                cur = max(cur, done)
                j += 1
                continue
            piece_end = min(b.end, top.starts[j]) if j < nt else b.end
            out.add(cur, piece_end - cur, b.pos, b.rec_off, b.layer, b.room)
            cur = done = piece_end
    while j < nt:
        out.add(*top[j])
        j += 1
    return out
