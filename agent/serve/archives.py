"""Opening the archives to serve: checks, chain order, and each device's resolved table.

Only a regular file or an ``s3://`` object can be served: the trailing index says where
every record is, and a record is read where it lies (a file with ``os.pread``, an object
with one ranged GET a record). An encrypted archive is served with a key that is one of its
recipients: its index and every record are opened with the archive's record key, each only
after it authenticated. Everything is checked before the first client connects: each
archive's seal and index (:class:`agent.archive.indexed.IndexedArchive`), the chain's order
and parents exactly as ``restore`` checks them (:func:`agent.chain.check_chain`), and that
every device asked for is in every archive at the same size. The walk that checks an index
also gathers its entries (1 MiB pieces at a time) into packed per-device tables, and the
tables of a chain are laid over each other, newest on top (:mod:`agent.serve.segments`).
Each archive is opened once: what is checked is what is served.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, cast

from agent.archive.format import INDEX_ENTRY, Device, RecordType
from agent.archive.index_walk import Collect
from agent.archive.indexed import IndexedArchive, read_seal
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
    sealer: RecordSealer | None  # an encrypted archive's record opener
    gathered: _Gather | None  # its index's entries of the devices served (tables wanted)


class _Gather:
    """The entries of the devices served, gathered from the walk that checks the index
    (IndexedArchive's ``also``), then made into a segment table per device. The entries
    come in the order the records were written, so each one's room (the bytes to the next
    record listed) is known when the next one comes."""

    def __init__(self, ids: set[int]) -> None:
        self.runs: dict[int, list[bytes]] = {dev: [] for dev in ids}
        # The last entry kept (device, offset, length, position, DATA bit): its room is
        # known when the next entry comes.
        self._last: tuple[int, int, int, int, int] | None = None

    def collect(self, piece: memoryview) -> None:
        runs, last, pack = self.runs, self._last, _SLOT.pack
        mine: dict[int, list[bytes]] = {dev: [] for dev in runs}
        for rt, _c, _r, dev, off, ln, pos in INDEX_ENTRY.iter_unpack(piece):
            if last is not None:
                l_dev, l_off, l_ln, l_pos, l_bit = last
                room = pos - l_pos if l_bit else 0
                mine[l_dev].append(pack(l_off, l_ln, l_pos | l_bit,
                                        room if 0 < room <= MAX_RECORD else 0))
            last = (dev, off, ln, pos, _DATA_BIT if rt == _DATA else 0) if dev in runs else None
        self._last = last
        for dev, slots in mine.items():
            if slots:
                slots.sort()
                runs[dev].append(b"".join(slots))

    def tables(self, index_pos: int, layer: int) -> dict[int, Segments]:
        """Each device's segment table, keyed by its id in the archive (``index_pos``:
        where the index starts, which the last record's room runs to)."""
        if self._last is not None:
            l_dev, l_off, l_ln, l_pos, l_bit = self._last
            self._last = None
            self.runs[l_dev].append(_SLOT.pack(l_off, l_ln, l_pos | l_bit,
                                               _room(l_pos, index_pos) if l_bit else 0))
        runs, self.runs = self.runs, {}
        return {dev: _table(parts, layer) for dev, parts in runs.items()}


def _room(pos: int, next_pos: int) -> int:
    n = next_pos - pos
    return n if 0 < n <= MAX_RECORD else 0  # 0: read the frame first


def _open_random(path: str) -> tuple[BinaryIO | None, Source]:
    """``path`` opened once: as a file for the checks (None: the source is one), and as the
    source records are read from, the same file (a file put at the path meanwhile is never
    served unchecked)."""
    if path.startswith("s3://"):  # imported here: boto3 is heavy
        from agent.s3.objects import RangedObject

        # A missing object says so (ArchiveError); one HEAD for the checks and the reads.
        return None, RangedObject(path, connections=8)
    f = open(path, "rb")  # noqa: SIM115 (closed by the caller)
    try:
        return f, FileSource(path, fd=os.dup(f.fileno()))
    except BaseException:
        f.close()
        raise


def _open_one(path: str, keys: Sequence[X25519PrivateKey],
              wanted: Callable[[list[Device]], set[int]] | None) -> _Opened:
    """``path`` checked and opened; ``wanted``: the ids of the devices whose entries to
    gather, given the archive's devices (None: only check)."""
    check_seekable(path)
    try:
        f, source = _open_random(path)
    except OSError as e:
        raise ArchiveError(f"cannot open {path}: {e.strerror}") from e
    try:
        return _check_one(path, keys, wanted, f if f is not None else cast(BinaryIO, source),
                          source)
    except BaseException:
        source.close()
        raise
    finally:
        if f is not None:
            f.close()


def _check_one(path: str, keys: Sequence[X25519PrivateKey],
               wanted: Callable[[list[Device]], set[int]] | None, f: BinaryIO,
               source: Source) -> _Opened:
    try:
        seal = read_seal(f)
    except ArchiveError as e:
        # The end is what serving needs first: a cut or still growing file has none.
        raise ArchiveError(f"{path}: {e}: the archive is incomplete (truncated, or still "
                           "being written); only a complete archive can be served "
                           "(`backup-agent verify` reads it from the start)") from e
    except OSError as e:
        raise ArchiveError(f"cannot read {path}: {e.strerror}") from e
    gathered: list[_Gather] = []

    def gather(devices: list[Device]) -> Collect | None:
        if wanted is None:
            return None
        gathered.append(_Gather(wanted(devices)))
        return gathered[0].collect

    try:
        # Seal, index and both ends checked (the entries gathered on the way); an
        # encrypted archive opened with the key.
        with IndexedArchive(path, keys, f=f, also=gather, index=wanted is not None) as arc:
            if not arc.has_index:
                raise ArchiveError(f"{path} has no index, so it cannot be served (it was "
                                   "written without one): restore it instead")
            link = Link(path, arc.header, arc.devices)
            sealer = arc.sealer
    except ArchiveError as e:
        msg = str(e)
        raise ArchiveError(msg if msg.startswith(path) else f"{path}: {msg}") from e
    except OSError as e:
        raise ArchiveError(f"cannot open {path}: {e.strerror}") from e
    return _Opened(path, source, link, seal.footer.index_pos, sealer,
                   gathered[0] if gathered else None)


def _table(parts: list[bytes], layer: int) -> Segments:
    """One device's sorted runs of packed entries, merged into a segment table. The loop
    of :meth:`Segments.add`, inlined: it runs once per record of the archive (a fully
    written 1 TiB disk has half a million), before the first read is served."""
    seg = Segments()
    starts, lengths, positions, rec_offs, layers = (seg.starts.append, seg.lengths.append,
                                                    seg.pos.append, seg.rec_off.append,
                                                    seg.layer.append)
    rooms = seg.room.append
    end = 0  # of the last segment
    zero_run = False  # the last segment is zeros (the next zeros that touch it extend it)
    for off, ln, pos, room in _in_order(parts):
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


def _in_order(parts: list[bytes]) -> Iterator[tuple[int, int, int, int]]:
    """The entries of the sorted runs ``parts``, unpacked, in offset order. Runs that do
    not interleave (a backup writes a device mostly in order, a piece of the index at a
    time) are put in order by their first entries and read straight through, a third of the
    time of merging them entry by entry."""
    n = _SLOT.size
    parts.sort(key=lambda run: run[:n])
    if all(parts[k][-n:] <= parts[k + 1][:n] for k in range(len(parts) - 1)):
        # Run after run, each unpacked in place: no copy of the whole table's entries.
        return itertools.chain.from_iterable(_SLOT.iter_unpack(p) for p in parts)
    return map(_SLOT.unpack, heapq.merge(*(_split(p) for p in parts)))


def _split(run: bytes) -> Iterator[bytes]:
    view = memoryview(run)
    for k in range(0, len(run), _SLOT.size):
        yield bytes(view[k : k + _SLOT.size])


class ServedArchives:
    """The devices of an archive or chain, ready to serve; :meth:`close` when done."""

    def __init__(self, paths: Sequence[str], wanted: Sequence[str] | None = None,
                 cache: int = DEFAULT_CACHE, *, tables: bool = True,
                 verb: str = "serve", keys: Sequence[X25519PrivateKey] = ()) -> None:
        """``tables=False``: only open and check the archives' ends and the chain (the
        command, before it starts nbdkit, which walks and checks the indexes as it builds
        the tables): :attr:`devices` is then empty, :attr:`names` is not.
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
        asked = list(dict.fromkeys(wanted)) if wanted else None
        for p in paths:
            # The devices served: those asked for, or the full backup's (the first archive).
            served = asked if asked is not None or not self._opened else [
                d.name for d in self._opened[0].link.devices]

            def pick(devices: list[Device], served: list[str] | None = served) -> set[int]:
                return {d.id for d in devices if served is None or d.name in served}

            self._opened.append(_open_one(p, self._keys, pick if tables else None))
        links = [o.link for o in self._opened]
        first = links[0]
        names = asked if asked is not None else [d.name for d in first.devices]
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
            if opened.gathered is None:
                raise AssertionError("internal: the index entries were not gathered")
            by_id = opened.gathered.tables(opened.index_pos, layer)
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
