"""The archive reader: one pass over a stream, checking everything on the way.

The algorithm (docs/FORMAT.md, "Reading") in short:

1. Check the preamble. Then read records one by one: frame header (magic, CRC,
   body length under the limit, ``seq`` equal to the count so far), body, digest.
2. Record 0 is HEADER. DEVICE, CONFIG and CONFIG_DATA records follow before any
   DATA or ZERO record. DATA and ZERO name a declared device, lie inside it and
   overlap nothing seen before. INDEX records come after all data.
3. END carries the record count, the totals and the chained digest of every
   record before it; all must match, and the INDEX records, if any, must list exactly
   the DATA and ZERO records read (index_check.py). A FULL archive must cover every byte of
   every device. Then the 48-byte footer, then nothing but zero bytes (tape
   padding) until the end of the stream.

Only after step 3 does :meth:`ArchiveReader.records` finish without raising, so a
consumer that commits its results only after the iterator is exhausted never
takes a truncated or damaged archive for a complete one.

DATA payload digests are checked as each body is read, while it is still in the
CPU's cache: a restore measured 6% faster so than with its workers checking them
(docs/PERFORMANCE.md). ``verify_data=False`` plus :meth:`DataRecord.check` leaves
the check to the consumer.
"""

from __future__ import annotations

import io
import os
import select
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import blake3

from agent import interrupts
from agent.archive import codec
from agent.archive.format import (
    CHUNK_FIXED,
    DIGEST_SIZE,
    FLAG_OPTIONAL,
    FOOTER,
    FRAME,
    INDEX_ENTRY,
    KNOWN_FLAGS,
    NO_INDEX,
    PREAMBLE,
    Chain,
    Chunk,
    Compression,
    Config,
    Details,
    Device,
    Encryption,
    End,
    Footer,
    Header,
    Kind,
    RecordType,
    Zero,
    check_preamble,
    unpack_frame,
)
from agent.archive.index_check import IndexCheck
from agent.archive.intervals import IntervalSet, Overlap
from agent.archive.output import grow_pipe
from agent.errors import ArchiveError, UnsupportedArchive

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from agent.archive import crypto

_OPEN_SLACK = 15  # crypto.OPEN_SLACK, without importing cryptography for plain archives
_METADATA = {RecordType.DEVICE, RecordType.CONFIG, RecordType.CONFIG_DATA}
_KNOWN = frozenset(RecordType)


@dataclass
class RawRecord:
    pos: int  # byte position of the frame header
    rtype: int
    flags: int
    seq: int
    frame: bytes
    body: memoryview
    digest: bytes
    opened: bool = False  # decrypted: its sealed body's digest was checked, then its tag

    def digest_ok(self) -> bool:
        if self.opened:
            return True
        return bytes(blake3.blake3(self.body).digest(DIGEST_SIZE)) == self.digest


#: What one record handed out by the reader costs beyond its buffers: the Python objects
#: (record, raw record, chunk, views, digest, frame header) and a consumer's share of a
#: batch list and a future. Measured at about 1.3 KiB with tracemalloc; charged with room,
#: so that a consumer that counts it keeps memory bounded even with 1-byte records.
RECORD_OVERHEAD = 2048


@dataclass
class DataRecord:
    device: Device
    offset: int
    length: int
    chunk: Chunk
    raw: RawRecord
    _spares: SpareBuffers | None = None
    _out: bytearray | None = None  # what data() decompresses into

    def check(self) -> None:
        if not self.raw.digest_ok():
            raise ArchiveError(
                f"device {self.device.name!r}: data record at byte {self.raw.pos} "
                f"(device offset {self.offset}) fails its checksum"
            )

    def reserve(self) -> int:
        """Take now the buffer :meth:`data` will decompress into, and return the bytes this
        record holds until :meth:`release`: what a consumer that bounds its memory charges
        for it (its buffers as allocated, rounded up to their size class, not its length)."""
        if (self._out is None and self._spares is not None
                and self.chunk.compression == Compression.ZSTD):
            self._out = self._spares.take(self.length)
        buf = self.raw.body.obj
        held = RECORD_OVERHEAD + (len(buf) if isinstance(buf, bytearray) else self.raw.body.nbytes)
        return held + (len(self._out) if self._out is not None else 0)

    def release(self) -> None:
        """Done with this record's bytes (and with what :meth:`data` returned): the
        reader may reuse its buffers for a later record."""
        if self._spares is None:
            return
        buf = self.raw.body.obj
        if isinstance(buf, bytearray):
            self._spares.give(buf)
        if self._out is not None:
            self._spares.give(self._out)
        self._spares = self._out = None

    def data(self) -> bytes | bytearray | memoryview:
        """The device bytes, decompressed and length-checked (digest not checked here).

        Valid until :meth:`release`: a compressed payload is decompressed into one of
        the reader's spare buffers."""
        out = None
        if self._spares is not None and self.chunk.compression == Compression.ZSTD:
            out = self._out = self._out or self._spares.take(self.length)
        return codec.decompress(
            self.chunk.compression, self.raw.body[CHUNK_FIXED:], self.length,
            f"device {self.device.name!r}: data record at byte {self.raw.pos}", out,
        )


@dataclass
class ZeroRecord:
    device: Device
    offset: int
    length: int


#: Spares kept at most, by default: a restore keeps what its --memory allows instead.
#: A cap by count (64) made a restore of 64 KiB records allocate, zero and fault in a
#: fresh buffer for most records.
DEFAULT_SPARE_BYTES = 64 * 1024 * 1024
_SMALLEST = 256  # the smallest size class


def size_class(n: int) -> int:
    """The size of the buffer :class:`SpareBuffers` allocates for ``n`` bytes: ``n``
    rounded up to an eighth of its power of two (at most 1/8 more), and at least 256.

    Classes let bodies of similar size (compressed ones vary) share buffers. A coarse
    grain wastes memory: a 64 KiB grain gave a 1-byte record a 64 KiB buffer and a
    64 KiB record (its body 24 bytes more) a 128 KiB one."""
    if n <= _SMALLEST:
        return _SMALLEST
    step = 1 << ((n - 1).bit_length() - 4)
    return -(-n // step) * step


class SpareBuffers:
    """Buffers handed back by consumers, for later records' bodies and decompressed
    payloads: reusing them spares a zeroed allocation, and the page faults of its
    first touch, per record on the restore path (8% of a restore's CPU time with
    fresh buffers for decompression alone, docs/PERFORMANCE.md). Thread-safe: the
    reader takes bodies while workers take and give back.

    The buffers kept and those handed out (and not given back) together stay within
    ``limit`` bytes, plus two of the largest buffers taken, whenever those handed out
    alone do: a spare is dropped before a new buffer is allocated past it, and a buffer
    given back past it is not kept. So a consumer that charges what it holds
    (:meth:`DataRecord.reserve`) against a budget of ``limit`` bytes holds no more in
    buffers, kept spares included, than that and the record it read ahead of its budget
    (its body and decompression buffer). Without that slack every record read ahead
    meant a spare dropped and a buffer allocated afresh: 2 MiB records took 8% more CPU
    time."""

    def __init__(self, limit: int = DEFAULT_SPARE_BYTES) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._by_size: dict[int, list[bytearray]] = {}  # non-empty lists only
        self._bytes = 0  # in the spares
        self._out = 0  # handed out by take() and not given back
        self._largest = 0  # buffer taken

    def _room(self) -> int:
        return self.limit + 2 * self._largest

    def take(self, n: int) -> bytearray:
        """A buffer of at least ``n`` bytes and at most twice its size class: a spare of
        the smallest size that fits, or a new one."""
        size = size_class(n)
        with self._lock:
            fits = self._by_size.get(size)
            if fits is None:  # the next larger size that has one (few sizes are in use)
                larger = [k for k in self._by_size if size < k <= 2 * size]
                fits = self._by_size[min(larger)] if larger else None
            self._largest = max(self._largest, size)
            if fits is not None:
                buf = fits.pop()
                if not fits:
                    del self._by_size[len(buf)]
                self._bytes -= len(buf)
                self._out += len(buf)
                return buf
            # A new buffer: drop spares that would take the total past the limit.
            over = self._bytes + self._out + size > self._room()
            for k in sorted(self._by_size, reverse=True) if over else ():
                bufs = self._by_size[k]
                while bufs and self._bytes + self._out + size > self._room():
                    bufs.pop()
                    self._bytes -= k
                if not bufs:
                    del self._by_size[k]
            self._out += size
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        with self._lock:
            self._out = max(0, self._out - len(buf))
            if self._bytes + self._out + len(buf) <= self._room():
                self._by_size.setdefault(len(buf), []).append(buf)
                self._bytes += len(buf)

    @property
    def kept(self) -> int:
        """Bytes in the spares."""
        return self._bytes


#: Config bytes an :class:`ArchiveReader` holds for :meth:`ArchiveReader.config`, all
#: configs together (declared sizes, in the order declared): a config past it is checked
#: and dropped, so a few KiB of zstd frames in one config cannot make a reader that wants
#: another one hold gigabytes. Larger configs are read with ``on_config_data``.
KEPT_CONFIG_BYTES = 16 * 1024 * 1024

#: Bodies at least this long are read straight from the stream into their own buffer.
_DIRECT = 256 * 1024
#: How much a refill of the read-ahead buffer asks for while records are small.
_READ_AHEAD = 512 * 1024


class _Input:
    """Exact reads from a stream, with the byte position for error messages.

    Small reads (frame headers, digests, small bodies) are served from a read-ahead
    buffer, one ``read`` for many records. Large bodies go straight from the stream
    into their own buffer, and while records are large the read-ahead shrinks to the
    next frame header, so their bytes are never copied twice: through a 1 MiB
    BufferedReader, a compressed 2 MiB record (under 1 MiB) always was (3% of a
    restore's CPU time in memmove). DATA bodies can be read into reused buffers
    (``reuse=True``) from :attr:`spares`, which the consumer refills through
    :meth:`DataRecord.release`."""

    def __init__(self, f: BinaryIO, spares: SpareBuffers | None = None) -> None:
        self.f = f
        self.pos = 0
        self.spares = spares if spares is not None else SpareBuffers()
        self.on_wait: Callable[[], None] | None = None
        self._poll: select.poll | None = None  # for a pipe or socket: is input waiting?
        try:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                self._poll = select.poll()
                self._poll.register(f.fileno(), select.POLLIN)
        except (AttributeError, OSError, io.UnsupportedOperation):
            pass  # not a descriptor (BytesIO): never waits
        self._buf = memoryview(bytearray(_READ_AHEAD))
        self._lo = self._hi = 0  # the bytes read ahead: _buf[_lo:_hi]
        self._ahead = _READ_AHEAD  # what a refill asks for

    def _from_buffer(self, dest: memoryview) -> int:
        k = min(len(dest), self._hi - self._lo)
        dest[:k] = self._buf[self._lo : self._lo + k]
        self._lo += k
        return k

    def _fill(self, dest: memoryview) -> int:
        """Fill ``dest``; fewer bytes only at the end of the stream (a pipe may return
        short reads: keep reading)."""
        got = self._from_buffer(dest)
        while got < len(dest):
            if self._poll is not None and not self._poll.poll(0):
                if self.on_wait is not None:
                    self.on_wait()  # the read below would wait for the writer of the pipe
                # In steps, so that Ctrl-C is answered: see agent.interrupts.
                while not self._poll.poll(int(interrupts.STEP * 1000)):
                    pass
            rest = dest[got:]
            if len(rest) >= _DIRECT:
                k = self.f.readinto(rest)  # type: ignore[attr-defined]
            else:
                want = max(len(rest), self._ahead)
                self._lo, self._hi = 0, self.f.readinto(self._buf[:want]) or 0  # type: ignore[attr-defined]
                k = self._from_buffer(rest)
            if not k:
                break
            got += k
        self.pos += got
        return got

    def read(self, n: int, what: str, reuse: bool = False, body: bool = False) -> memoryview:
        """Exactly ``n`` bytes. ``body``: a record's body, whose size predicts the next's."""
        view = memoryview(self.spares.take(n) if reuse else bytearray(n))[:n]
        if body:
            # After a large body, read ahead only its digest and the next frame header.
            self._ahead = DIGEST_SIZE + FRAME.size if n >= _DIRECT else _READ_AHEAD
        got = self._fill(view)
        if got < n:
            raise ArchiveError(
                f"the archive is truncated at byte {self.pos} (inside {what}): "
                "it is incomplete"
            )
        return view

    def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes: fewer only at the end of the stream."""
        buf = bytearray(n)
        return bytes(buf[: self._fill(memoryview(buf))])


class ArchiveReader:
    """Reads an archive from a stream (pipe or file) from its first byte."""

    def __init__(
        self, f: BinaryIO, *, verify_data: bool = True, keep_configs: bool = True,
        spares: SpareBuffers | None = None,
        on_config_data: Callable[[Config, bytes | bytearray | memoryview], None] | None = None,
        keys: Sequence[X25519PrivateKey] = (), label: str = "the archive",
    ) -> None:
        # ``keep_configs``: hold configs in memory for config(), up to KEPT_CONFIG_BYTES
        # in all. And/or ``on_config_data``: each config's data, piece by piece and in
        # order, as it is read (each piece checked and at most 32 MiB), kept by no one but
        # the callee: the way to read a config of any size.
        # ``spares``: shared by the readers of a chain, whose archives are read one by one.
        self._in = _Input(f, spares)
        self.verify_data = verify_data
        self.keep_configs = keep_configs
        self._on_config_data = on_config_data
        self._device_names: set[str] = set()  # a list scan per device was O(n^2)
        self._config_ids: dict[str, int] = {}
        self._seq = 0
        self._pending: RawRecord | None = None
        self.devices: list[Device] = []
        self.configs: list[Config] = []
        self.config_data: dict[str, bytearray] = {}  # the configs kept, by name
        self._kept_bytes = 0  # declared sizes of the configs in config_data
        self._config_filled: list[int] = []
        self._coverage: list[IntervalSet] = []
        self.data_bytes = 0
        self.zero_bytes = 0
        self.stored_bytes = 0
        self.end: End | None = None
        self._index_check = IndexCheck()  # counts the DATA/ZERO records and the entries
        self._index_pos = NO_INDEX
        self._seen_index = False
        self._chain_before_end = b""
        self.archive_len = 0  # known once the footer is read, padding excluded
        self._sealer: crypto.RecordSealer | None = None

        preamble = bytes(self._in.read_some(PREAMBLE.size))
        check_preamble(preamble)
        self._chain = Chain(preamble)
        first = self._next_raw()
        if first is None:
            raise ArchiveError(f"the archive ends at byte {self._in.pos}: it is incomplete")
        if first.rtype != RecordType.HEADER:
            raise ArchiveError("the archive does not start with a header record")
        self._checked(first, "header record")
        self.header = Header.decode(first.body)
        if self.header.encryption != Encryption.NONE:
            self._unlock(first, keys, label)
        # Read the metadata up to the first record that is not metadata.
        while True:
            raw = self._next_raw()
            if raw is None:
                raise ArchiveError(f"the archive ends at byte {self._in.pos}: it is incomplete")
            if raw.rtype in _METADATA:
                self._metadata(raw)
            elif raw.flags & FLAG_OPTIONAL and raw.rtype not in _KNOWN:
                self._checked(raw, f"optional record of type {raw.rtype:#06x}")
            else:
                self._pending = raw
                break

    def _unlock(self, first: RawRecord, keys: Sequence[X25519PrivateKey], label: str) -> None:
        """Find the data key and read DETAILS, which must follow HEADER."""
        from agent.archive import crypto  # here: cryptography costs plain archives 65 ms

        if not keys:
            raise crypto.KeyRequired(self.header, label)
        self._sealer = crypto.opener(self.header, first.body, keys, label)
        raw = self._next_raw()
        if raw is None:
            raise ArchiveError(f"the archive ends at byte {self._in.pos}: it is incomplete")
        if raw.rtype != RecordType.DETAILS:
            raise ArchiveError(f"encrypted archive: record 1 at byte {raw.pos} is not its "
                               "details record")
        self.header = self.header.with_details(Details.decode(raw.body))

    @property
    def sealer(self) -> crypto.RecordSealer | None:
        """An encrypted archive's record opener (None for a plain archive): random access
        (agent/archive/indexed.py) opens the records it reads with it."""
        return self._sealer

    @property
    def on_input_wait(self) -> Callable[[], None] | None:
        """Called in the reading thread before a read that will wait for input (from a
        pipe whose writer is behind): a consumer that holds records back to hand them on
        in batches hands them on now, instead of when input comes."""
        return self._in.on_wait

    @on_input_wait.setter
    def on_input_wait(self, fn: Callable[[], None] | None) -> None:
        self._in.on_wait = fn

    # -- frames ------------------------------------------------------------------------

    def _next_raw(self) -> RawRecord | None:
        pos = self._in.pos
        head = self._in.read_some(FRAME.size)
        if not head:
            return None
        if len(head) < FRAME.size:
            raise ArchiveError(
                f"the archive is truncated at byte {pos + len(head)} (inside a record header): "
                "it is incomplete"
            )
        fr = unpack_frame(head, pos)
        if fr.seq != self._seq:
            raise ArchiveError(
                f"record at byte {pos} has sequence number {fr.seq}, expected {self._seq}: "
                "records were dropped, duplicated or reordered"
            )
        if fr.flags & ~KNOWN_FLAGS:
            raise UnsupportedArchive(f"record at byte {pos} has unknown flags {fr.flags:#x}")
        body = self._in.read(fr.body_len, f"record {fr.seq}", reuse=fr.rtype == RecordType.DATA,
                             body=True)
        dig = bytes(self._in.read(DIGEST_SIZE, f"record {fr.seq}"))
        self._seq += 1
        if fr.rtype == RecordType.END:
            self._chain_before_end = self._chain.value()  # END seals what precedes it
        self._chain.add(head, dig)
        raw = RawRecord(pos, fr.rtype, fr.flags, fr.seq, head, body, dig)
        if self._sealer is not None:
            self._open(raw)
        return raw

    def _open(self, raw: RawRecord) -> None:
        """Replace a sealed body by the plain one, once it authenticated: nothing
        decrypted is handed on before that. Damage is told apart from alteration by the
        digest, checked first."""
        assert self._sealer is not None
        self._checked(raw, f"record {raw.seq}")
        sealed = raw.body
        data = raw.rtype == RecordType.DATA
        # A DATA body is decrypted into a spare buffer, as it was read into one.
        into = self._in.spares.take(len(sealed) + _OPEN_SLACK) if data else None
        try:
            raw.body = self._sealer.open(raw.rtype, raw.flags, raw.seq, sealed, raw.pos, into)
        except BaseException:
            if into is not None:
                self._in.spares.give(into)
            raise
        finally:
            if data and isinstance(sealed.obj, bytearray):
                self._in.spares.give(sealed.obj)  # read into a spare: done with it
        raw.opened = True

    def _checked(self, raw: RawRecord, what: str) -> None:
        if not raw.digest_ok():
            raise ArchiveError(f"{what} at byte {raw.pos} fails its checksum")

    # -- metadata ----------------------------------------------------------------------

    def _metadata(self, raw: RawRecord) -> None:
        if raw.rtype == RecordType.DEVICE:
            self._checked(raw, "device record")
            dev = Device.decode(raw.body)
            if dev.id != len(self.devices):
                raise ArchiveError(f"device record at byte {raw.pos} has id {dev.id}, "
                                   f"expected {len(self.devices)}")
            if dev.name in self._device_names:
                raise ArchiveError(f"device name {dev.name!r} appears twice (byte {raw.pos})")
            self._device_names.add(dev.name)
            self.devices.append(dev)
            self._coverage.append(IntervalSet())
        elif raw.rtype == RecordType.CONFIG:
            self._checked(raw, "config record")
            cfg = Config.decode(raw.body)
            if cfg.id != len(self.configs):
                raise ArchiveError(f"config record at byte {raw.pos} has id {cfg.id}, "
                                   f"expected {len(self.configs)}")
            if cfg.name in self._config_ids:
                raise ArchiveError(f"config name {cfg.name!r} appears twice (byte {raw.pos})")
            self._config_ids[cfg.name] = cfg.id
            self.configs.append(cfg)
            self._config_filled.append(0)
            if self.keep_configs and self._kept_bytes + cfg.size <= KEPT_CONFIG_BYTES:
                self.config_data[cfg.name] = bytearray()
                self._kept_bytes += cfg.size
        else:
            self._checked(raw, "config data record")
            what = f"config data record at byte {raw.pos}"
            ch = Chunk.decode(raw.body, what)
            if ch.target >= len(self.configs):
                raise ArchiveError(f"{what} names config {ch.target}, which was never declared")
            cfg = self.configs[ch.target]
            if ch.offset != self._config_filled[ch.target] or ch.offset + ch.length > cfg.size:
                raise ArchiveError(f"{what}: config {cfg.name!r} data out of order or too long")
            data = codec.decompress(ch.compression, raw.body[CHUNK_FIXED:], ch.length, what)
            self._config_filled[ch.target] += ch.length
            kept = self.config_data.get(cfg.name)
            if kept is not None:
                kept += data
            if self._on_config_data is not None:
                self._on_config_data(cfg, data)

    def config_info(self, name: str) -> Config:
        """The config record named ``name``, complete in the archive."""
        cfg_id = self._config_ids.get(name)
        if cfg_id is None:
            names = ", ".join(c.name for c in self.configs) or "none"
            raise ArchiveError(f"no config named {name!r} in the archive (it has: {names})")
        cfg = self.configs[cfg_id]
        if self._config_filled[cfg.id] != cfg.size:
            raise ArchiveError(f"config {name!r} is incomplete in the archive")
        return cfg

    def config(self, name: str) -> bytes:
        """A stored config blob, complete and checked, if this reader kept it
        (``keep_configs``, up to :data:`KEPT_CONFIG_BYTES` of configs in all)."""
        cfg = self.config_info(name)
        kept = self.config_data.get(cfg.name)
        if kept is None:
            why = ("configs are not kept (keep_configs=False)" if not self.keep_configs else
                   f"configs over {KEPT_CONFIG_BYTES} bytes in all are read only as they "
                   "stream by")
            raise ArchiveError(f"config {name!r} ({cfg.size} bytes) was not kept in memory: "
                               f"{why}; `backup-agent config` writes any config out")
        return bytes(kept)

    # -- data --------------------------------------------------------------------------

    def records(self) -> Iterator[DataRecord | ZeroRecord]:
        """Yield every DATA and ZERO record; return only after the seal checked out."""
        while True:
            raw = self._pending if self._pending is not None else self._next_raw()
            self._pending = None
            if raw is None:
                raise ArchiveError(
                    f"the archive ends at byte {self._in.pos} without its end record: "
                    "it is incomplete"
                )
            rtype = raw.rtype
            if rtype == RecordType.DATA:
                yield self._data(raw)
            elif rtype == RecordType.ZERO:
                yield self._zero(raw)
            elif rtype == RecordType.INDEX:
                self._index(raw)
            elif rtype == RecordType.END:
                self._end(raw)
                return
            elif rtype in _METADATA or rtype in (RecordType.HEADER, RecordType.DETAILS):
                raise ArchiveError(
                    f"{RecordType(rtype).name.lower()} record at byte {raw.pos} "
                    "comes after device data"
                )
            elif raw.flags & FLAG_OPTIONAL:
                self._checked(raw, f"optional record of type {rtype:#06x}")
            else:
                raise UnsupportedArchive(
                    f"record type {rtype:#06x} at byte {raw.pos} is required to read this "
                    "archive but unknown to this backup-agent: a newer version wrote it"
                )

    def _claim(self, raw: RawRecord, dev_id: int, offset: int, length: int, what: str) -> Device:
        """Check that a record's range is inside a declared device and new."""
        try:
            if self._seen_index:
                raise ArchiveError(f"{what} at byte {raw.pos} comes after the index")
            if dev_id >= len(self.devices):
                raise ArchiveError(f"{what} at byte {raw.pos} names device {dev_id}, "
                                   "which was never declared")
            dev = self.devices[dev_id]
            if offset + length > dev.size:
                raise ArchiveError(
                    f"device {dev.name!r}: {what} at byte {raw.pos} covers "
                    f"{offset}..{offset + length}, past the device's end ({dev.size})"
                )
            try:
                self._coverage[dev_id].add(offset, offset + length)
            except Overlap as o:
                raise ArchiveError(
                    f"device {dev.name!r}: {what} at byte {raw.pos} overlaps data already "
                    f"in the archive at device offset {o.start}"
                ) from None
            return dev
        except ArchiveError:
            # Damage is the likelier cause of nonsense fields: say so if the digest agrees.
            self._checked(raw, what)
            raise

    def _data(self, raw: RawRecord) -> DataRecord:
        what = f"data record at byte {raw.pos}"
        try:
            ch = Chunk.decode(raw.body, what)
        except ArchiveError:
            self._checked(raw, "data record")
            raise
        dev = self._claim(raw, ch.target, ch.offset, ch.length, "data record")
        rec = DataRecord(dev, ch.offset, ch.length, ch, raw, self._in.spares)
        if self.verify_data:
            rec.check()
        self.data_bytes += ch.length
        self.stored_bytes += len(raw.body) - CHUNK_FIXED
        self._index_check.record(raw.rtype, ch.compression, ch.target, ch.offset, ch.length,
                                 raw.pos)
        return rec

    def _zero(self, raw: RawRecord) -> ZeroRecord:
        self._checked(raw, "zero record")
        z = Zero.decode(raw.body)
        dev = self._claim(raw, z.device, z.offset, z.length, "zero record")
        self.zero_bytes += z.length
        self._index_check.record(raw.rtype, 0, z.device, z.offset, z.length, raw.pos)
        return ZeroRecord(dev, z.offset, z.length)

    def _index(self, raw: RawRecord) -> None:
        self._checked(raw, "index record")
        if len(raw.body) % INDEX_ENTRY.size:
            raise ArchiveError(f"index record at byte {raw.pos} has a partial entry")
        if not self._seen_index:
            self._index_pos = raw.pos
        self._seen_index = True
        self._index_check.index(raw.body)

    def _end(self, raw: RawRecord) -> None:
        chain_before = self._chain_before_end
        self._checked(raw, "end record")
        end = End.decode(raw.body)
        problems = []
        if end.records != raw.seq:
            problems.append(f"{raw.seq} records present, the seal says {end.records}")
        if end.chain != chain_before:
            problems.append("the chained digest does not match")
        if (end.data_bytes, end.zero_bytes, end.stored_bytes) != (
            self.data_bytes, self.zero_bytes, self.stored_bytes
        ):
            problems.append("data totals do not match")
        if (end.devices, end.configs) != (len(self.devices), len(self.configs)):
            problems.append("device or config counts do not match")
        check = self._index_check
        if self._seen_index and check.entries != check.records:
            problems.append(f"the index lists {check.entries} records, "
                            f"the archive holds {check.records}")
        elif self._seen_index and not check.matches():
            problems.append(f"its index lists {check.entries} records, as many as it holds, "
                            "but not these: an entry's type, compression, device, range or "
                            "position is not its record's")
        if problems:
            raise ArchiveError(f"end record at byte {raw.pos} does not seal the archive: "
                               + "; ".join(problems))
        for cfg in self.configs:
            if self._config_filled[cfg.id] != cfg.size:
                raise ArchiveError(f"config {cfg.name!r} is incomplete in the archive")
        if self.header.kind == Kind.FULL:
            for dev, cov in zip(self.devices, self._coverage, strict=True):
                gaps = cov.gaps(dev.size)
                if gaps:
                    s, e = gaps[0]
                    raise ArchiveError(
                        f"device {dev.name!r}: bytes {s}..{e} are missing from this full "
                        f"backup ({len(gaps)} gap(s) in all)"
                    )
        footer_pos = self._in.pos
        footer = Footer.decode(self._in.read_some(FOOTER.size), footer_pos)
        if (footer.end_pos, footer.index_pos, footer.archive_len) != (
            raw.pos, self._index_pos, footer_pos + FOOTER.size
        ):
            raise ArchiveError(f"the footer at byte {footer_pos} does not match the archive")
        self.archive_len = footer.archive_len
        # Tape drives pad the last block with zeros; anything else is not ours.
        while True:
            tail = self._in.read_some(1 << 20)
            if not tail:
                break
            if tail.count(0) != len(tail):
                first = self._in.pos - len(tail) + len(tail) - len(tail.lstrip(b"\0"))
                raise ArchiveError(f"unexpected data after the end of the archive at byte {first}")
        self.end = end

    @property
    def position(self) -> int:
        return self._in.pos

    @property
    def data_start(self) -> int | None:
        """Byte position of the first record after the metadata, before :meth:`records`
        is iterated (None once it was)."""
        return self._pending.pos if self._pending is not None else None


def open_stream(path: str) -> BinaryIO:
    """Open ``path`` (or standard input for ``-``) for sequential reading."""
    # Unbuffered: _Input does its own read-ahead, around the large bodies.
    if path == "-":
        grow_pipe(0)
        return io.FileIO(0, "rb", closefd=False)
    if path.startswith("s3://"):  # one GET, resumed if it breaks (imported here: boto3)
        from agent.s3.objects import ObjectStream

        return ObjectStream(path)  # type: ignore[return-value]
    try:
        return open(path, "rb", buffering=0)
    except OSError as e:
        raise ArchiveError(f"cannot open {path}: {e.strerror}") from e
