"""Opening the archives to serve: checks, chain order, and each device's resolved table.

Only a regular file can be served: the trailing index says where every record is, and a
record is read where it lies. Everything is checked before the first client connects: each
archive's seal and index (:class:`agent.archive.indexed.IndexedArchive`), the chain's order
and parents exactly as ``restore`` checks them (:func:`agent.chain.check_chain`), and that
every device asked for is in every archive at the same size. Then each archive's index is
walked once more, in 1 MiB pieces, into packed per-device tables, and the tables of a chain
are laid over each other, newest on top (:mod:`agent.serve.segments`).
"""

from __future__ import annotations

import contextlib
import heapq
import os
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import blake3

from agent.archive.format import DIGEST_SIZE, FRAME, INDEX_ENTRY, RecordType
from agent.archive.index_walk import PIECE, frame_at
from agent.archive.indexed import IndexedArchive, read_seal
from agent.chain import Link, check_chain
from agent.errors import ArchiveError, InvalidArgument
from agent.serve.cache import RecordCache
from agent.serve.image import DeviceImage, Layer
from agent.serve.segments import ZERO, Segments, overlay

#: --cache's default: 16 records of the 2 MiB a backup writes, the working set of a reader
#: with a few streams, well under the 128 MiB a served 1 TiB archive may take in all.
DEFAULT_CACHE = 64 << 20

SAVE_FIRST = "save it to a file first (`cat > vm.arc`) and serve that file"

# A table entry while sorting: device offset, length, record position with DATA in the top
# bit. Big-endian, so packed entries sort as bytes in offset order.
_SLOT = struct.Struct(">QQQ")
_DATA_BIT = 1 << 63
_DATA = RecordType.DATA & 0xFF


def check_seekable(path: str) -> None:
    """Refuse, with what to do instead, anything but a regular file."""
    if path == "-":
        raise InvalidArgument(f"cannot serve standard input: serving reads records where they "
                              f"lie, through the archive's trailing index; {SAVE_FIRST}")
    if path.startswith("s3://"):  # (ranged GETs through agent/s3/objects.py: not yet)
        raise InvalidArgument(f"{path}: serve does not read s3:// archives yet; copy the "
                              "object to a file first (aws s3 cp) and serve that")
    try:
        st = os.stat(path)
    except OSError as e:
        raise ArchiveError(f"cannot open {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        what = ("a pipe" if stat.S_ISFIFO(st.st_mode) else "a directory"
                if stat.S_ISDIR(st.st_mode) else "a device (a tape?)"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a file")
        raise InvalidArgument(f"{path} is {what}: only an archive file with its trailing "
                              f"index can be served; {SAVE_FIRST}")


@dataclass(frozen=True)
class _Opened:
    path: str
    fd: int
    link: Link
    index_pos: int  # the first INDEX record: every DATA record ends before it
    end_pos: int  # the END record


def _open_one(path: str) -> _Opened:
    check_seekable(path)
    try:
        with open(path, "rb") as f:
            seal = read_seal(f)
    except ArchiveError as e:
        # The end is what serving needs first: a cut or still growing file has none.
        raise ArchiveError(f"{path}: {e}: the archive is incomplete (truncated, or still "
                           "being written); only a complete archive file can be served "
                           "(`backup-agent verify` reads it from the start)") from e
    except OSError as e:
        raise ArchiveError(f"cannot open {path}: {e.strerror}") from e
    try:
        with IndexedArchive(path) as arc:  # seal, index and both ends checked
            if arc.index is None:
                raise ArchiveError(f"{path} has no index, so it cannot be served (it was "
                                   "written without one): restore it instead")
            link = Link(path, arc.header, arc.devices)
    except ArchiveError as e:
        msg = str(e)
        raise ArchiveError(msg if msg.startswith(path) else f"{path}: {msg}") from e
    except OSError as e:
        raise ArchiveError(f"cannot open {path}: {e.strerror}") from e
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # the file the rest is read from
    return _Opened(path, fd, link, seal.footer.index_pos, seal.footer.end_pos)


def _tables(opened: _Opened, wanted_ids: set[int], layer: int) -> dict[int, Segments]:
    """Each wanted device's entries in ``opened``'s index, sorted, as a segment table
    (keyed by the device's id in this archive)."""
    runs: dict[int, list[bytes]] = {dev: [] for dev in wanted_ids}

    def collect(piece: memoryview) -> None:
        mine: dict[int, list[bytes]] = {}
        for rt, _c, _r, dev, off, ln, pos in INDEX_ENTRY.iter_unpack(piece):
            if dev in runs:
                mine.setdefault(dev, []).append(
                    _SLOT.pack(off, ln, pos | (_DATA_BIT if rt == _DATA else 0)))
        for dev, slots in mine.items():
            slots.sort()
            runs[dev].append(b"".join(slots))

    with os.fdopen(os.dup(opened.fd), "rb") as f:
        _index_pieces(f, opened.index_pos, opened.end_pos, collect)
    return {dev: _table(parts, layer) for dev, parts in runs.items()}


def _index_pieces(f: BinaryIO, index_pos: int, end_pos: int,
                  collect: Callable[[memoryview], None]) -> None:
    """Hand ``collect`` the entries of the INDEX records from ``index_pos`` to END, in
    pieces, each record's digest checked (a damaged one raises, and the caller keeps
    nothing). Every entry was checked moments before, by IndexedArchive's walk of the same
    index (agent/archive/index_walk.py); this walk only gathers them, at a third of the
    cost. Whatever it gathers is bounded anyway: only declared devices are kept, overlaps
    are refused by :func:`_table`, and reads never go past a device's end."""
    pos = index_pos
    while pos < end_pos:
        fr = frame_at(f, pos, end_pos)
        if fr.rtype == RecordType.INDEX:
            h = blake3.blake3()
            left = fr.body_len
            f.seek(pos + FRAME.size)
            while left:
                piece = f.read(min(PIECE, left))
                if not piece:
                    raise ArchiveError(f"the archive is truncated inside the record at "
                                       f"byte {pos}")
                h.update(piece)
                left -= len(piece)
                view = memoryview(piece)
                collect(view[: len(view) - len(view) % INDEX_ENTRY.size])
            if f.read(DIGEST_SIZE) != h.digest(DIGEST_SIZE):
                raise ArchiveError(f"index record at byte {pos} fails its checksum")
        pos += FRAME.size + fr.body_len + DIGEST_SIZE


def _table(parts: list[bytes], layer: int) -> Segments:
    """One device's sorted runs of packed entries, merged into a segment table. The loop
    of :meth:`Segments.add`, inlined: it runs once per record of the archive (a fully
    written 1 TiB disk has half a million), before the first read is served."""
    seg = Segments()
    starts, lengths, positions, rec_offs, layers = (seg.starts.append, seg.lengths.append,
                                                    seg.pos.append, seg.rec_off.append,
                                                    seg.layer.append)
    unpack = _SLOT.unpack
    end = 0  # of the last segment
    zero_run = False  # the last segment is zeros (the next zeros that touch it extend it)
    for slot in heapq.merge(*(_split(p) for p in parts)):
        off, ln, pos = unpack(slot)
        if off < end:
            raise ArchiveError(f"the index lists overlapping ranges at device offset {off}: "
                               "the index is damaged")
        if pos & _DATA_BIT:
            starts(off)
            lengths(ln)
            positions(pos & ~_DATA_BIT)
            rec_offs(off)
            layers(layer)
            zero_run = False
        elif zero_run and off == end:
            seg.lengths[-1] += ln
        else:
            starts(off)
            lengths(ln)
            positions(ZERO)
            rec_offs(0)
            layers(0)
            zero_run = True
        end = off + ln
    return seg


def _split(run: bytes) -> Iterator[bytes]:
    view = memoryview(run)
    for k in range(0, len(run), _SLOT.size):
        yield bytes(view[k : k + _SLOT.size])


class ServedArchives:
    """The devices of an archive or chain, ready to serve; :meth:`close` when done."""

    def __init__(self, paths: Sequence[str], wanted: Sequence[str] | None = None,
                 cache: int = DEFAULT_CACHE, *, tables: bool = True,
                 verb: str = "serve") -> None:
        """``tables=False``: only open and check (the command, before it starts nbdkit,
        which builds the tables): :attr:`devices` is then empty, :attr:`names` is not.
        ``verb``: what the command does, in the messages about a wrong chain."""
        self.verb = verb
        if not paths:
            raise InvalidArgument("no archive to serve")
        self.cache = RecordCache(cache)
        self.devices: dict[str, DeviceImage] = {}
        self.names: list[str] = []
        self._opened: list[_Opened] = []
        try:
            self._open(paths, wanted, tables)
        except BaseException:
            self.close()
            raise

    def _open(self, paths: Sequence[str], wanted: Sequence[str] | None, tables: bool) -> None:
        if len(set(paths)) != len(paths):
            raise InvalidArgument("the same archive is given twice")
        for p in paths:
            self._opened.append(_open_one(p))
        links = [o.link for o in self._opened]
        first = links[0]
        names = list(dict.fromkeys(wanted)) if wanted else [d.name for d in first.devices]
        known = {d.name for d in first.devices}
        for name in names:
            if name not in known:
                raise InvalidArgument(f"no device named {name!r} in {first.label} (it has "
                                      f"{', '.join(sorted(known)) or 'none'})")
        check_chain(links, names, self.verb)
        self.names = names
        if not tables:
            return
        resolved: dict[str, Segments] = {}
        for layer, opened in enumerate(self._opened):
            ids = {d.id for d in opened.link.devices if d.name in names}
            by_id = _tables(opened, ids, layer)
            for d in opened.link.devices:
                if d.name in names:
                    below = resolved.get(d.name)
                    resolved[d.name] = by_id[d.id] if below is None else overlay(below,
                                                                                 by_id[d.id])
        for name in names:
            size = next(d.size for d in first.devices if d.name == name)
            layers = [Layer(o.path, o.fd, o.index_pos,
                            next(d.id for d in o.link.devices if d.name == name))
                      for o in self._opened]
            self.devices[name] = DeviceImage(name, size, resolved[name], layers, self.cache)

    @property
    def links(self) -> list[Link]:
        return [o.link for o in self._opened]

    def close(self) -> None:
        for o in self._opened:
            with contextlib.suppress(OSError):
                os.close(o.fd)
        self._opened = []
