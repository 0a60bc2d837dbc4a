"""One served device: reads and block status over its resolved segments.

Every DATA record is checked as the streaming reader checks it before a byte of it is
served: the frame (magic, CRC, type, length within the archive), the digest of the body,
its seal (an encrypted archive's: decrypted only once it authenticated), the fixed part
(device, offset, compression), and the decompressed length. A record that fails any of
these fails the reads that need it (:class:`DamagedRecord`, EIO to the client) and is never
served as data; the records around it still are.

A record is read where it lies, through a :class:`Source`: a file (``os.pread``) or an
``s3://`` object (one ranged GET, :meth:`agent.s3.objects.RangedObject.pread`). Where the
index says how far the next record is, frame, body and digest come in one read.
"""

from __future__ import annotations

import bisect
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

from agent.archive import codec
from agent.archive.format import (
    CHUNK_FIXED,
    DIGEST_SIZE,
    FRAME,
    MAX_BODY,
    Chunk,
    Compression,
    RecordType,
    digest,
    unpack_frame,
)
from agent.errors import ArchiveError
from agent.serve.cache import Buffer, RecordCache
from agent.serve.readahead import AHEAD, MIN_READ, Readahead
from agent.serve.segments import ZERO, Segments

if TYPE_CHECKING:  # cryptography is imported only for encrypted archives
    from agent.archive.crypto import RecordSealer

#: The most one read of a record asks for: its frame, the largest body, its digest.
MAX_RECORD = FRAME.size + MAX_BODY + DIGEST_SIZE
#: Segments looked at past a read for its readahead, at most (tiny records of an
#: incremental would make AHEAD bytes many).
_AHEAD_SEGMENTS = 64


class Source(Protocol):
    """Where an archive's bytes are read from; safe to call from several threads."""

    def pread(self, n: int, pos: int) -> bytes:
        """Up to ``n`` bytes at ``pos`` (fewer only at the end); OSError or ArchiveError."""
        ...

    def close(self) -> None: ...


class FileSource:
    """An archive file, read with ``os.pread``: threads share it without seeking."""

    def __init__(self, path: str, fd: int | None = None) -> None:
        """``fd``: ``path`` already open (taken over)."""
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if fd is None else fd

    def pread(self, n: int, pos: int) -> bytes:
        return os.pread(self.fd, n, pos)

    def close(self) -> None:
        os.close(self.fd)


class DamagedRecord(ArchiveError):
    """A record needed by a read cannot be served: its message names the archive and
    the record's byte position."""


@dataclass(frozen=True)
class Layer:
    """One archive of the chain as a device's records are read from it."""

    path: str
    source: Source
    data_end: int  # where the index starts: every DATA record ends before it
    device_id: int  # the device's id in this archive (ids may differ between archives)
    sealer: RecordSealer | None = None  # an encrypted archive's record opener


def _read_record(layer: Layer, pos: int, room: int) -> tuple[int, int, int, memoryview, bytes]:
    """(type, flags, seq, body, digest) of the record at ``pos``, not yet checked beyond its
    frame. ``room``: bytes from ``pos`` to the next record the index lists (0: unknown),
    which hold this one whole: then one read takes frame, body and digest."""
    one_read = 0 < room <= MAX_RECORD and pos + room <= layer.data_end
    raw = layer.source.pread(room if one_read else FRAME.size, pos)
    if len(raw) < FRAME.size:
        raise ArchiveError("the archive is truncated there")
    fr = unpack_frame(raw[:FRAME.size], pos)
    if fr.rtype != RecordType.DATA:
        raise ArchiveError(f"the index names a record of type {fr.rtype:#06x} there: "
                           "the index is damaged")
    end = FRAME.size + fr.body_len + DIGEST_SIZE
    if pos + end > layer.data_end:
        raise ArchiveError("the record runs into the index")
    if one_read:
        if end > len(raw):
            raise ArchiveError("the record runs into the next one the index lists: the "
                               "index is damaged")
        view = memoryview(raw)
        return (fr.rtype, fr.flags, fr.seq, view[FRAME.size:end - DIGEST_SIZE],
                raw[end - DIGEST_SIZE:end])
    rest = layer.source.pread(end - FRAME.size, pos + FRAME.size)
    if len(rest) != end - FRAME.size:
        raise ArchiveError("the archive is truncated inside it")
    return (fr.rtype, fr.flags, fr.seq, memoryview(rest)[:fr.body_len], rest[fr.body_len:])


def load_record(layer: Layer, pos: int, rec_off: int, room: int = 0) -> Buffer:
    """The decompressed DATA record at ``pos`` of ``layer``, which the index says starts at
    device offset ``rec_off`` (``room``: see :func:`_read_record`); every check of the
    streaming reader made first."""
    where = f"{layer.path}: data record at byte {pos}"
    try:
        rtype, flags, seq, body, dig = _read_record(layer, pos, room)
        if digest(body) != dig:
            raise ArchiveError("it fails its checksum")
        if layer.sealer is not None:  # nothing of it is used before it authenticated
            body = layer.sealer.open(rtype, flags, seq, body, pos)
        ch = Chunk.decode(body, "it")
        if (ch.target, ch.offset) != (layer.device_id, rec_off):
            raise ArchiveError("it is not the record the index names: the index is damaged")
        # Into a buffer of its own, as restore decompresses DATA records: that path also
        # refuses bytes after the frame (tests/unit/test_fuzz_regressions.py).
        out = bytearray(ch.length) if ch.compression != Compression.NONE else None
        data = codec.decompress(ch.compression, body[CHUNK_FIXED:], ch.length, "its payload",
                                out=out)
    except OSError as e:
        raise DamagedRecord(f"{where}: cannot be read: {e.strerror or e}") from e
    except ArchiveError as e:
        raise DamagedRecord(f"{where}: {e}") from e
    return data if isinstance(data, bytes | memoryview) else bytes(data)


class DeviceImage:
    """A device of the served archive (or chain), read-only."""

    def __init__(self, name: str, size: int, segments: Segments, layers: Sequence[Layer],
                 cache: RecordCache, readahead: Readahead | None = None) -> None:
        self.name = name
        self.size = size
        self.segments = segments
        self.layers = list(layers)
        self._cache = cache
        self._ahead = readahead
        self._zeros: tuple[array[int], array[int]] | None = None  # _zero_runs()

    def _record(self, layer: int, pos: int, rec_off: int, room: int) -> Buffer:
        lay = self.layers[layer]
        return self._cache.get((lay.path, pos), lambda: load_record(lay, pos, rec_off, room))

    def _read_ahead(self, i: int, end: int) -> None:
        """Have the records after segment ``i`` that hold the bytes up to
        ``end`` + AHEAD loaded (agent/serve/readahead.py)."""
        ahead, segs = self._ahead, self.segments
        if ahead is None or not ahead.alone():
            return
        limit = end + AHEAD
        for j in range(i + 1, min(i + 1 + _AHEAD_SEGMENTS, len(segs))):
            if segs.starts[j] >= limit:
                break
            pos = segs.pos[j]
            if pos == ZERO:
                continue
            lay = self.layers[segs.layer[j]]
            ahead.want((lay.path, pos),
                       partial(load_record, lay, pos, segs.rec_off[j], segs.room[j]))

    def read(self, offset: int, length: int) -> Buffer:
        """Bytes ``offset..offset+length``; raises :class:`DamagedRecord`."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ArchiveError(f"device {self.name!r}: range {offset}+{length} is outside "
                               "the device")
        segs, end = self.segments, offset + length
        # Most requests lie inside one segment: answer them without building a Segment.
        i = bisect.bisect_right(segs.starts, offset) - 1
        if i >= 0 and end <= segs.starts[i] + segs.lengths[i]:
            pos = segs.pos[i]
            if pos == ZERO:
                return bytes(length)
            rec_off = segs.rec_off[i]
            rec = self._record_of(segs.layer[i], pos, rec_off, segs.room[i], segs.starts[i],
                                  segs.lengths[i])
            piece = rec[offset - rec_off : end - rec_off]
            if len(piece) != length:
                raise self._short(segs.layer[i], pos)
            if length >= MIN_READ:
                self._read_ahead(i, end)
            return piece  # no copy, no zero-filled buffer
        out = bytearray(length)  # gaps read as zeros (ZERO records; none in a FULL)
        i = segs.first_at(offset)
        while i < len(segs) and segs.starts[i] < end:
            s = segs[i]
            i += 1
            if s.pos == ZERO:
                continue
            rec = self._record_of(s.layer, s.pos, s.rec_off, s.room, s.start, s.length)
            lo, hi = max(offset, s.start), min(end, s.end)
            piece = rec[lo - s.rec_off : hi - s.rec_off]
            if len(piece) != hi - lo:
                raise self._short(s.layer, s.pos)
            out[lo - offset : hi - offset] = piece
        if length >= MIN_READ:
            self._read_ahead(i - 1, end)
        return out

    def _record_of(self, layer: int, pos: int, rec_off: int, room: int, start: int,
                   length: int) -> Buffer:
        try:
            return self._record(layer, pos, rec_off, room)
        except DamagedRecord as e:
            raise DamagedRecord(f"device {self.name!r}: reads of bytes {start}.."
                                f"{start + length} fail: {e}") from e

    def _short(self, layer: int, pos: int) -> DamagedRecord:
        """The record is shorter than its index entry says (the index is damaged)."""
        return DamagedRecord(f"device {self.name!r}: {self.layers[layer].path}: data record "
                             f"at byte {pos} holds fewer bytes than its index entry")

    def extents(self, offset: int, length: int, limit: int = 4096) -> list[tuple[int, int, bool]]:
        """(offset, length, zero) runs from ``offset`` on, ascending and contiguous, at
        most ``limit`` of them, covering at least ``offset`` (as NBD block status may)."""
        z_starts, z_ends = self._zero_runs()
        end = min(offset + length, self.size)
        out: list[tuple[int, int, bool]] = []
        cur = offset
        k = bisect.bisect_right(z_ends, cur)  # the first run of zeros that ends after cur
        while cur < end and len(out) < limit:
            if k < len(z_starts) and z_starts[k] <= cur:
                nxt = min(z_ends[k], end)
                out.append((cur, nxt - cur, True))
                k += 1
            else:  # data up to the next run of zeros
                nxt = min(z_starts[k], end) if k < len(z_starts) else end
                out.append((cur, nxt - cur, False))
            cur = nxt
        return out

    def _zero_runs(self) -> tuple[array[int], array[int]]:
        """Starts and ends of the ranges that read as zeros (ZERO segments, and gaps where
        nothing was recorded), merged where they touch: block status answers from them
        without a step per segment (a fully written 1 TiB disk has half a million data
        segments, one run of data). Made at the first block status, in one pass."""
        runs = self._zeros
        if runs is None:
            starts, ends = array("Q"), array("Q")
            segs, last = self.segments, 0  # where the segment before ended
            for start, length, pos in zip(segs.starts, segs.lengths, segs.pos, strict=True):
                lo = last if start > last else start  # a gap before it reads as zeros too
                if pos == ZERO or lo < start:
                    hi = start + length if pos == ZERO else start
                    if ends and ends[-1] == lo:
                        ends[-1] = hi
                    else:
                        starts.append(lo)
                        ends.append(hi)
                last = start + length
            if last < self.size:
                if ends and ends[-1] == last:
                    ends[-1] = self.size
                else:
                    starts.append(last)
                    ends.append(self.size)
            runs = self._zeros = (starts, ends)  # threads racing here build the same
        return runs
