"""Reading a Proxmox VMA archive in one pass, as :class:`~agent.archive.reader.ArchiveReader`
reads ours: the same attributes and records, so restore, verify, info and config take
either without knowing which.

What is checked (Proxmox's ``vma verify`` checks the same):

1. The header: magic, version, size within bounds, MD5, blob pointers, device names.
2. Each extent: magic, MD5 of its header, the archive's uuid, its block count against
   its clusters' masks, every cluster for a declared device, inside it, and not seen
   before; the stored blocks are all there (else: truncated).
3. At the end of the stream: every cluster of every device was present, and anything
   after the last extent is zero bytes (tape padding), as our own reader allows.

VMA's MD5s cover headers only: the data blocks carry no checksum, so damage inside data
cannot be detected (our format's records can). Memory: one extent (at most 3.7 MiB) in a
buffer from the shared :class:`~agent.archive.reader.SpareBuffers`, and per device a bitmap
of the clusters seen (:class:`_ClusterMap`), whatever order the archive chose.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from agent.archive.format import CHUNK_FIXED, Chunk, Compression, Config, Device, End, Header
from agent.archive.reader import (
    RECORD_OVERHEAD,
    DataRecord,
    RawRecord,
    SpareBuffers,
    ZeroRecord,
    _Input,
)
from agent.errors import ArchiveError
from agent.targets.base import ZEROS
from agent.vma.format import (
    BLOCK_SIZE,
    CLUSTER_SIZE,
    EXTENT_HEADER_SIZE,
    BlockInfo,
    VmaHeader,
    header_size_of,
    parse_extent_header,
    parse_header,
)

#: What ``info`` shows as the tool that wrote a VMA archive.
VMA_TOOL = "Proxmox vzdump (VMA)"


#: mmap's MAP_NORESERVE on Linux (the module lacks the name): no swap reserved for a map
#: whose pages are mostly never touched.
_MAP_NORESERVE = 0x4000
_FF = b"\xff" * (1 << 20)


class _ClusterMap:
    """Which clusters of a device were seen: one bit each, in an anonymous map whose pages
    the kernel provides only once written. So memory follows the device's size (at most
    1/524288 of it, for a 256 TiB device 512 MiB of address space) and how much of it the
    archive touched, never how the archive orders or scatters its clusters: a hostile
    stream of scattered clusters costs a few bytes of memory per 64 KiB of device, where a
    set of ranges would grow with every cluster."""

    def __init__(self, clusters: int) -> None:
        self.clusters = clusters
        self.seen = 0
        size = max(1, -(-clusters // 8))
        try:
            self._bits = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                   | _MAP_NORESERVE)
        except OSError as e:
            raise ArchiveError(f"cannot map {size} bytes to track a device's clusters: "
                               f"{e.strerror}") from e

    def add(self, cluster: int) -> bool:
        """Mark ``cluster`` seen; False if it was already."""
        i, bit = cluster >> 3, 1 << (cluster & 7)
        b = self._bits[i]
        if b & bit:
            return False
        self._bits[i] = b | bit
        self.seen += 1
        return True

    def first_missing(self) -> int | None:
        """The first cluster not seen, or None."""
        if self.seen == self.clusters:  # duplicates were refused: every one is there
            return None
        step = len(_FF)
        for a in range(0, len(self._bits), step):
            chunk = self._bits[a : a + step]
            full = len(chunk) - len(chunk.lstrip(b"\xff"))  # bytes with all 8 seen
            if full < len(chunk):
                byte = chunk[full]
                bit = next(b for b in range(8) if not byte >> b & 1)
                return (a + full) * 8 + bit
        return None  # not reached: fewer seen than there are means one is missing

    def close(self) -> None:
        self._bits.close()


class _Shared:
    """One extent's data buffer, shared by the records cut from it: back to the spares
    when the last of them is released."""

    __slots__ = ("buf", "lock", "refs", "spares")

    def __init__(self, buf: bytearray, spares: SpareBuffers) -> None:
        self.buf = buf
        self.spares = spares
        self.refs = 0
        self.lock = threading.Lock()

    def drop(self) -> None:
        with self.lock:
            self.refs -= 1
            last = self.refs == 0
        if last:
            self.spares.give(self.buf)


class VmaDataRecord(DataRecord):
    """Stored blocks of one device, contiguous in the device and in their extent."""

    _shared: _Shared | None
    _view: memoryview
    _cost: int

    def check(self) -> None:
        pass  # VMA data carries no checksum: the extent header's MD5 was checked

    def reserve(self) -> int:
        return self._cost

    def release(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.drop()

    def data(self) -> bytes | bytearray | memoryview:
        return self._view


def _stands_for(length: int) -> RawRecord:
    """A raw record whose body is as long as our format's for ``length`` stored bytes:
    restore counts stored bytes as ``raw.body.nbytes - CHUNK_FIXED``. No copy: a view of
    the shared zero buffer."""
    return RawRecord(0, 0, 0, 0, b"", memoryview(ZEROS)[: CHUNK_FIXED + length], b"")


class VmaReader:
    """Reads a VMA archive from a stream (pipe or file) from its first byte."""

    def __init__(
        self, f: BinaryIO, *, verify_data: bool = True, keep_configs: bool = True,
        spares: SpareBuffers | None = None,
        on_config_data: Callable[[Config, bytes | bytearray | memoryview], None] | None = None,
    ) -> None:
        # The arguments are ArchiveReader's; ``verify_data`` changes nothing (no data
        # checksums).
        del verify_data
        self._in = _Input(f, spares)
        first = bytes(self._in.read(60, "the VMA header"))
        size = header_size_of(first)
        head = first + bytes(self._in.read(size - len(first), "the VMA header"))
        self.vma: VmaHeader = parse_header(head)
        self.header = Header(uuid=self.vma.uuid, created_ns=self.vma.ctime * 10**9,
                             tool_version=VMA_TOOL)
        self.devices = [Device(i, d.name, d.size, {"vma-dev-id": str(d.dev_id)})
                        for i, d in enumerate(self.vma.devices)]
        self._by_dev_id = {d.dev_id: i for i, d in enumerate(self.vma.devices)}
        self._seen = [_ClusterMap(-(-d.size // CLUSTER_SIZE)) for d in self.devices]
        self.configs = [Config(i, name, len(data)) for i, (name, data)
                        in enumerate(self.vma.configs)]
        self.config_data = {name: data for name, data in self.vma.configs} if keep_configs else {}
        self.keep_configs = keep_configs
        for cfg, (_, data) in zip(self.configs, self.vma.configs, strict=True):
            if on_config_data is not None:
                on_config_data(cfg, data)
        self.extents = 0
        self.data_bytes = 0  # device bytes in stored blocks
        self.zero_bytes = 0  # device bytes in blocks the masks leave out
        self.archive_len = 0  # known at the end
        self.end: End | None = None
        self._data_start: int | None = self.position

    @property
    def position(self) -> int:
        return self._in.pos

    @property
    def data_start(self) -> int | None:
        return self._data_start

    @property
    def on_input_wait(self) -> Callable[[], None] | None:
        return self._in.on_wait

    @on_input_wait.setter
    def on_input_wait(self, fn: Callable[[], None] | None) -> None:
        self._in.on_wait = fn

    # -- configs -----------------------------------------------------------------------

    def config_info(self, name: str) -> Config:
        for cfg in self.configs:
            if cfg.name == name:
                return cfg
        names = ", ".join(c.name for c in self.configs) or "none"
        raise ArchiveError(f"no config named {name!r} in the archive (it has: {names})")

    def config(self, name: str) -> bytes:
        self.config_info(name)
        if name not in self.config_data:
            raise ArchiveError(f"config {name!r} was not kept in memory (keep_configs=False)")
        return self.config_data[name]

    # -- extents -----------------------------------------------------------------------

    def records(self) -> Iterator[DataRecord | ZeroRecord]:
        """Yield the device data of every extent; return only after the end checked out."""
        self._data_start = None
        while True:
            pos = self.position
            head = self._in.read_some(EXTENT_HEADER_SIZE)
            if not head or head.count(0) == len(head):
                self._finish(pos)
                return
            if len(head) < EXTENT_HEADER_SIZE:
                raise ArchiveError(f"the archive is truncated at byte {pos + len(head)} "
                                   "(inside a VMA extent header): it is incomplete")
            yield from self._extent(head, pos)

    def _extent(self, head: bytes, pos: int) -> Iterator[DataRecord | ZeroRecord]:
        ext = parse_extent_header(head, self.vma.uuid, pos)
        self.extents += 1
        for info in ext.infos:
            i = self._by_dev_id.get(info.dev_id)
            if i is None:
                raise ArchiveError(f"VMA extent at byte {pos} holds a cluster for device "
                                   f"{info.dev_id}, which the header does not declare")
            dev = self.devices[i]
            if info.cluster * CLUSTER_SIZE >= dev.size:
                raise ArchiveError(f"VMA extent at byte {pos}: cluster {info.cluster} of "
                                   f"device {dev.name!r} lies past its end ({dev.size})")
            last = dev.size - info.cluster * CLUSTER_SIZE  # bytes of the device left
            if info.mask >> -(-last // BLOCK_SIZE):
                raise ArchiveError(f"VMA extent at byte {pos}: cluster {info.cluster} of "
                                   f"device {dev.name!r} stores blocks past its end")
            if not self._seen[i].add(info.cluster):
                raise ArchiveError(f"VMA extent at byte {pos}: cluster {info.cluster} of "
                                   f"device {dev.name!r} appears twice")
        nbytes = ext.data_size
        shared = None
        if nbytes:
            view = self._in.read(nbytes, f"the VMA extent at byte {pos}", reuse=True)
            buf = view.obj
            if not isinstance(buf, bytearray):  # SpareBuffers hands out bytearrays
                raise TypeError("a spare buffer is not a bytearray")
            shared = _Shared(buf, self._in.spares)
            shared.refs = 1  # held by this loop until every record is cut
        try:
            yield from self._cut(ext.infos, shared, nbytes)
        finally:
            if shared is not None:
                shared.drop()

    def _cut(self, infos: list[BlockInfo], shared: _Shared | None, nbytes: int
             ) -> Iterator[DataRecord | ZeroRecord]:
        """Records for the extent's clusters: runs of stored blocks as data, runs of
        blocks left out as zeros, each merged with the previous run where it continues it
        (one data record for a sequential extent of full clusters)."""
        runs: list[list[int]] = []  # [device index, stored (0/1), device start, end, buffer start]
        at = 0
        for info in infos:
            i = self._by_dev_id[info.dev_id]
            base = info.cluster * CLUSTER_SIZE
            size = self.devices[i].size
            for b in range(16):
                start = base + b * BLOCK_SIZE
                if start >= size:
                    break
                stored = info.mask >> b & 1
                end = min(start + BLOCK_SIZE, size)
                r = runs[-1] if runs else None
                if r is not None and r[0] == i and r[1] == stored and r[3] == start:
                    r[3] = end
                else:
                    runs.append([i, stored, start, end, at])
                if stored:
                    at += BLOCK_SIZE
        buf = memoryview(shared.buf) if shared is not None else None
        for i, stored, start, end, bstart in runs:
            dev = self.devices[i]
            length = end - start
            if not stored:
                self.zero_bytes += length
                yield ZeroRecord(dev, start, length)
                continue
            if shared is None or buf is None:  # stored blocks imply a buffer
                raise ArchiveError("VMA extent: stored blocks without data")
            rec = VmaDataRecord(dev, start, length, Chunk(dev.id, Compression.NONE, start,
                                                          length), _stands_for(length))
            rec._view = buf[bstart : bstart + length]
            # Each record carries its share of the buffer: together they charge all of it.
            rec._cost = RECORD_OVERHEAD + len(shared.buf) * length // max(nbytes, 1)
            with shared.lock:
                shared.refs += 1
            rec._shared = shared
            self.data_bytes += length
            yield rec

    def _finish(self, pos: int) -> None:
        """The stream ended at ``pos`` (or zeros start there): only zeros may follow, and
        every cluster must have been present."""
        while True:
            tail = self._in.read_some(1 << 20)
            if not tail:
                break
            if tail.count(0) != len(tail):
                at = self._in.pos - len(tail.lstrip(b"\0"))
                raise ArchiveError(f"unexpected data after the end of the VMA archive at "
                                   f"byte {at}")
        for dev, seen in zip(self.devices, self._seen, strict=True):
            first = seen.first_missing()
            if first is not None:
                what = ("has no data at all" if not seen.seen else
                        f"is missing cluster {first} ({seen.clusters - seen.seen} of "
                        f"{seen.clusters} missing in all)")
                raise ArchiveError(f"device {dev.name!r} {what}: the VMA archive is "
                                   f"incomplete (it ends at byte {pos})")
        for seen in self._seen:
            seen.close()
        self.archive_len = pos
        self.end = End(records=self.extents, data_bytes=self.data_bytes,
                       zero_bytes=self.zero_bytes, stored_bytes=self.data_bytes,
                       devices=len(self.devices), configs=len(self.configs),
                       chain=self.vma.md5)  # the header's digest stands for a seal
