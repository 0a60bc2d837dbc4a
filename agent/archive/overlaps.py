"""Checking that an index's ranges never overlap, in memory that does not grow with it.

The index lists records in the order they were written, which is not the device's order
(a live backup writes copied clusters first, then sweeps the disk), so overlaps cannot be
found by comparing neighbours. Two ways, by the archive's kind:

* A FULL archive covers each device exactly once: no overlap and no gap. Its ranges do so
  exactly when, per device, the multiset of their starts plus the device's size equals the
  multiset of their ends plus 0 (walking the device, each boundary opens one range and
  closes one). Two multisets are compared through a polynomial with a root at each
  element, evaluated at a point drawn at random per check (modulo the prime 2^127 - 1):
  equal multisets give equal values, different ones of n elements agree with probability
  n / 2^127 at most, and an archive cannot aim at a point it does not know. Constant
  memory, two multiplications an entry.
* Other kinds have gaps, so the entries are sorted by device and offset, on disk: each
  piece of the walk (32,768 entries) is sorted in memory and written to an unlinked
  temporary file as a run, then the runs are merged, :data:`FAN_IN` at a time, reading
  each in blocks of :data:`BLOCK` bytes; in the merged order an overlap is a range that
  starts before the one before it ends. Memory: one piece and FAN_IN blocks; disk: 20
  bytes an entry (twice, while a pass merges); time O(n log n).
"""

from __future__ import annotations

import heapq
import os
import secrets
import struct
import tempfile
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from agent.archive.format import INDEX_ENTRY, Device
from agent.errors import ArchiveError

_P = (1 << 127) - 1  # a Mersenne prime: every (device, offset) pair is below it
_KEY = struct.Struct(">IQQ")  # device, start, end: byte order is numeric order
#: Runs merged at a time, and the bytes read from each at a time while merging.
FAN_IN = 64
BLOCK = 16 * 1024 // _KEY.size * _KEY.size


def _point(device: int, offset: int) -> int:
    return device << 64 | offset


class ExactCover:
    """Whether the ranges fed cover every device exactly once (a FULL archive)."""

    def __init__(self, devices: Sequence[Device]) -> None:
        self._z = 2 + secrets.randbelow(_P - 2)
        self._starts = self._ends = 1  # the two polynomials' values at _z
        for d in devices:  # each device's size closes its last range; 0 opens its first
            self._starts = self._starts * (self._z - _point(d.id, d.size)) % _P
            self._ends = self._ends * (self._z - _point(d.id, 0)) % _P

    def collect(self, piece: memoryview) -> None:
        z, starts, ends = self._z, self._starts, self._ends
        for _t, _c, _r, dev, off, ln, _pos in INDEX_ENTRY.iter_unpack(piece):
            starts = starts * (z - (dev << 64 | off)) % _P
            ends = ends * (z - (dev << 64 | (off + ln))) % _P
        self._starts, self._ends = starts, ends

    def finish(self, names: Sequence[str]) -> str | None:
        if self._starts != self._ends:
            return ("the index lists ranges that overlap or leave gaps, though their lengths "
                    "add up to the devices' sizes: the index is damaged")
        return None


class NoOverlap:
    """Whether any two ranges of one device overlap (any kind), by an external sort."""

    def __init__(self) -> None:
        self._file: BinaryIO | None = None
        self._runs: list[tuple[int, int]] = []  # (byte position, bytes) in _file
        self._first: bytes = b""  # the first run, kept in memory while it is the only one

    def collect(self, piece: memoryview) -> None:
        keys = sorted(_KEY.pack(dev, off, off + ln)
                      for _t, _c, _r, dev, off, ln, _pos in INDEX_ENTRY.iter_unpack(piece))
        run = b"".join(keys)
        if not self._runs and not self._first:
            self._first = run
            return
        f = self._temp()
        if self._first:
            self._runs.append(_append(f, self._first))
            self._first = b""
        self._runs.append(_append(f, run))

    def _temp(self) -> BinaryIO:
        if self._file is None:
            try:
                # Unlinked from the start: nothing to clean up, whatever happens.
                self._file = tempfile.TemporaryFile(prefix="backup-agent-ranges-")  # noqa: SIM115
            except OSError as e:
                raise ArchiveError(f"cannot check the index for overlaps: no temporary file "
                                   f"in {tempfile.gettempdir()}: {e.strerror}") from e
        return self._file

    def finish(self, names: Sequence[str]) -> str | None:
        try:
            return self._scan(names)
        except OSError as e:
            raise ArchiveError(f"cannot check the index for overlaps: {e.strerror} in "
                               f"{tempfile.gettempdir()}") from e
        finally:
            self.close()

    def _scan(self, names: Sequence[str]) -> str | None:
        if self._file is None:
            keys: Iterator[bytes] = _keys(self._first)
        else:
            f = self._file
            runs = self._runs
            while len(runs) > FAN_IN:  # merge passes until one merge sees every run
                merged = []
                for k in range(0, len(runs), FAN_IN):
                    group = runs[k : k + FAN_IN]
                    f.seek(0, os.SEEK_END)
                    start = f.tell()
                    for block in _blocks(heapq.merge(*(_read(f, r) for r in group))):
                        f.write(block)
                    merged.append((start, f.tell() - start))
                runs = merged
            keys = heapq.merge(*(_read(f, r) for r in runs))
        prev_dev, prev_end = -1, 0
        for key in keys:
            dev, start, end = _KEY.unpack(key)
            if dev == prev_dev and start < prev_end:
                return (f"device {names[dev]!r}: the index lists overlapping ranges at device "
                        f"offset {start}: the index is damaged")
            prev_dev, prev_end = dev, end
        return None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._first = b""


def _append(f: BinaryIO, run: bytes) -> tuple[int, int]:
    f.seek(0, os.SEEK_END)
    pos = f.tell()
    f.write(run)
    return pos, len(run)


def _keys(run: bytes) -> Iterator[bytes]:
    for k in range(0, len(run), _KEY.size):
        yield run[k : k + _KEY.size]


def _read(f: BinaryIO, run: tuple[int, int]) -> Iterator[bytes]:
    """The keys of a run, read a block at a time."""
    pos, left = run
    f.flush()
    while left:
        block = os.pread(f.fileno(), min(BLOCK, left), pos)
        if not block:
            raise OSError(5, "the temporary file ended early")  # EIO
        pos += len(block)
        left -= len(block)
        yield from _keys(block)


def _blocks(keys: Iterator[bytes]) -> Iterator[bytes]:
    out = bytearray()
    for key in keys:
        out += key
        if len(out) >= BLOCK:
            yield bytes(out)
            out.clear()
    if out:
        yield bytes(out)
