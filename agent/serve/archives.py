"""Opening the archives to serve: checks, chain order, and each device's resolved table.

Only a regular file or an ``s3://`` object can be served: the trailing index says where
every record is, and a record is read where it lies (a file with ``os.pread``, an object
with one ranged GET a record). An encrypted archive is served with a key that is one of its
recipients: its index and every record are opened with the archive's record key, each only
after it authenticated. Everything is checked before the first client connects: each
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
from typing import TYPE_CHECKING, BinaryIO

import blake3

from agent.archive.format import DIGEST_SIZE, FRAME, INDEX_ENTRY, RecordType
from agent.archive.index_walk import PIECE, frame_at, sealed_body
from agent.archive.indexed import IndexedArchive, open_random, read_seal
from agent.chain import Link, check_chain
from agent.errors import ArchiveError, InvalidArgument
from agent.serve.cache import RecordCache
from agent.serve.image import MAX_RECORD, DeviceImage, FileSource, Layer, Source
from agent.serve.readahead import Readahead
from agent.serve.segments import ZERO, Segments, overlay

if TYPE_CHECKING:  # cryptography is imported only for encrypted archives
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from agent.archive.crypto import RecordSealer

#: --cache's default: 16 records of the 2 MiB a backup writes, the working set of a reader
#: with a few streams, well under the 128 MiB a served 1 TiB archive may take in all.
DEFAULT_CACHE = 64 << 20
#: The smallest --cache that reads ahead (agent/serve/readahead.py): the records being
#: read by a few streams and the ones ahead of each.
READAHEAD_MIN_CACHE = 16 << 20

SAVE_FIRST = "save it to a file first (`cat > vm.arc`) and serve that file"

# A table entry while sorting: device offset, length, record position with DATA in the top
# bit, room to the next record (image.py). Big-endian, so packed entries sort as bytes in
# offset order.
_SLOT = struct.Struct(">QQQI")
_DATA_BIT = 1 << 63
_DATA = RecordType.DATA & 0xFF


def check_seekable(path: str) -> None:
    """Refuse, with what to do instead, anything but a regular file or an object."""
    if path == "-":
        raise InvalidArgument(f"cannot serve standard input: serving reads records where they "
                              f"lie, through the archive's trailing index; {SAVE_FIRST}")
    if path.startswith("s3://"):  # read with ranged GETs (agent/s3/objects.py)
        return
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
    source: Source
    link: Link
    index_pos: int  # the first INDEX record: every DATA record ends before it
    end_pos: int  # the END record
    sealer: RecordSealer | None  # an encrypted archive's record opener


def _open_source(path: str) -> Source:
    if path.startswith("s3://"):  # imported here: boto3 is heavy
        from agent.s3.objects import RangedObject

        return RangedObject(path, connections=8)
    return FileSource(path)


def _open_one(path: str, keys: Sequence[X25519PrivateKey]) -> _Opened:
    check_seekable(path)
    try:
        f = open_random(path)  # a missing object says so itself (ArchiveError)
    except OSError as e:
        raise ArchiveError(f"cannot open {path}: {e.strerror}") from e
    try:
        with f:
            seal = read_seal(f)
    except ArchiveError as e:
        # The end is what serving needs first: a cut or still growing file has none.
        raise ArchiveError(f"{path}: {e}: the archive is incomplete (truncated, or still "
                           "being written); only a complete archive can be served "
                           "(`backup-agent verify` reads it from the start)") from e
    except OSError as e:
        raise ArchiveError(f"cannot read {path}: {e.strerror}") from e
    try:
        # Seal, index and both ends checked; an encrypted archive opened with the key.
        with IndexedArchive(path, keys) as arc:
            if arc.index is None:
                raise ArchiveError(f"{path} has no index, so it cannot be served (it was "
                                   "written without one): restore it instead")
            link = Link(path, arc.header, arc.devices)
            sealer = arc.sealer
    except ArchiveError as e:
        msg = str(e)
        raise ArchiveError(msg if msg.startswith(path) else f"{path}: {msg}") from e
    except OSError as e:
        raise ArchiveError(f"cannot open {path}: {e.strerror}") from e
    try:
        source = _open_source(path)  # what the records are read from
    except OSError as e:
        raise ArchiveError(f"cannot open {path}: {e.strerror}") from e
    return _Opened(path, source, link, seal.footer.index_pos, seal.footer.end_pos, sealer)


def _tables(opened: _Opened, wanted_ids: set[int], layer: int) -> dict[int, Segments]:
    """Each wanted device's entries in ``opened``'s index, sorted, as a segment table
    (keyed by the device's id in this archive). The entries come in the order the records
    were written, so each one's room (the bytes to the next record listed) is known when
    the next one comes."""
    runs: dict[int, list[bytes]] = {dev: [] for dev in wanted_ids}
    before: list[tuple[int, int, int, int, int]] = []  # the entry whose room is not known

    def room(pos: int, next_pos: int) -> int:
        n = next_pos - pos
        return n if 0 < n <= MAX_RECORD else 0  # 0: read the frame first

    def collect(piece: memoryview) -> None:
        mine: dict[int, list[bytes]] = {}
        for rt, _c, _r, dev, off, ln, pos in INDEX_ENTRY.iter_unpack(piece):
            if before:
                b_dev, b_off, b_ln, b_pos, b_bit = before.pop()
                mine.setdefault(b_dev, []).append(
                    _SLOT.pack(b_off, b_ln, b_pos | b_bit, room(b_pos, pos) if b_bit else 0))
            if dev in runs:
                before.append((dev, off, ln, pos, _DATA_BIT if rt == _DATA else 0))
        for dev, slots in mine.items():
            slots.sort()
            runs[dev].append(b"".join(slots))

    with open_random(opened.path) as f:
        _index_pieces(f, opened.index_pos, opened.end_pos, collect, opened.sealer)
    if before:  # the last record: the index follows it
        b_dev, b_off, b_ln, b_pos, b_bit = before.pop()
        runs[b_dev].append(_SLOT.pack(b_off, b_ln, b_pos | b_bit,
                                      room(b_pos, opened.index_pos) if b_bit else 0))
    return {dev: _table(parts, layer) for dev, parts in runs.items()}


def _index_pieces(f: BinaryIO, index_pos: int, end_pos: int,
                  collect: Callable[[memoryview], None], sealer: RecordSealer | None) -> None:
    """Hand ``collect`` the entries of the INDEX records from ``index_pos`` to END, in
    pieces, each record's digest checked (a damaged one raises, and the caller keeps
    nothing) and, sealed, opened. Every entry was checked moments before, by
    IndexedArchive's walk of the same index (agent/archive/index_walk.py); this walk only
    gathers them, at a third of the cost. Whatever it gathers is bounded anyway: only
    declared devices are kept, overlaps are refused by :func:`_table`, and reads never go
    past a device's end."""
    pos = index_pos
    while pos < end_pos:
        fr = frame_at(f, pos, end_pos)
        if fr.rtype == RecordType.INDEX and sealer is not None:
            sealed_body(f, pos, fr, collect, "index record", sealer)
        elif fr.rtype == RecordType.INDEX:
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
    rooms = seg.room.append
    unpack = _SLOT.unpack
    end = 0  # of the last segment
    zero_run = False  # the last segment is zeros (the next zeros that touch it extend it)
    for slot in heapq.merge(*(_split(p) for p in parts)):
        off, ln, pos, room = unpack(slot)
        if off < end:
            raise ArchiveError(f"the index lists overlapping ranges at device offset {off}: "
                               "the index is damaged")
        if pos & _DATA_BIT:
            starts(off)
            lengths(ln)
            positions(pos & ~_DATA_BIT)
            rec_offs(off)
            layers(layer)
            rooms(room)
            zero_run = False
        elif zero_run and off == end:
            seg.lengths[-1] += ln
        else:
            starts(off)
            lengths(ln)
            positions(ZERO)
            rec_offs(0)
            layers(0)
            rooms(0)
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
                 verb: str = "serve", keys: Sequence[X25519PrivateKey] = ()) -> None:
        """``tables=False``: only open and check (the command, before it starts nbdkit,
        which builds the tables): :attr:`devices` is then empty, :attr:`names` is not.
        ``verb``: what the command does, in the messages about a wrong chain. ``keys``:
        for encrypted archives (each archive of a chain may have its own recipients)."""
        self.verb = verb
        self._keys = tuple(keys)
        if not paths:
            raise InvalidArgument("no archive to serve")
        self.cache = RecordCache(cache)
        # Only with room for the records ahead besides those being read.
        self.readahead = Readahead(self.cache) if cache >= READAHEAD_MIN_CACHE else None
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
            self._opened.append(_open_one(p, self._keys))
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
            layers = [Layer(o.path, o.source, o.index_pos,
                            next(d.id for d in o.link.devices if d.name == name), o.sealer)
                      for o in self._opened]
            self.devices[name] = DeviceImage(name, size, resolved[name], layers, self.cache,
                                             self.readahead)

    @property
    def links(self) -> list[Link]:
        return [o.link for o in self._opened]

    def close(self) -> None:
        if self.readahead is not None:
            self.readahead.close()
        for o in self._opened:
            with contextlib.suppress(OSError):
                o.source.close()
        self._opened = []
