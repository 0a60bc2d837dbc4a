"""Writing a Proxmox VMA archive from the backup engine's records, strictly sequentially.

It stands where :class:`~agent.archive.writer.ArchiveWriter` stands (agent/writing.py
chooses), with the same methods the engine calls. The engine's records are ranges of any
length in completion order; VMA stores whole 64 KiB clusters, each exactly once. So:

- a record that covers whole clusters goes into the current extent at once, by reference
  (no copy: the extent is one ``writev`` of its header and views of the records' buffers);
- a cluster that records cover only in part waits in a buffer of its own until the rest
  of it arrives (records are 4 KiB-aligned runs of the engine's reads, so few wait);
- each cluster's 4 KiB blocks of zeros are left out (its mask says which are stored), and
  an extent is written when it holds 59 clusters, or when the engine's batch ends (its
  buffers are reused after that): its header's MD5 over its blockinfo.

The header (devices, configs) is written before the first extent, when all are known.
A full backup covers every byte of every device; :meth:`VmaWriter.finish` checks that
every cluster was written once. Incremental backups, encryption and compression do not
exist in VMA: agent/writing.py refuses them before anything is written.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping

from agent.archive.codec import CompressionSpec
from agent.archive.format import Compression, Config, Device, Header, check_name
from agent.archive.output import Buf, SequentialOutput
from agent.archive.writer import Totals
from agent.errors import ArchiveError, InvalidArgument
from agent.targets.base import ZEROS
from agent.vma.format import (
    BLOCK_SIZE,
    CLUSTER_SIZE,
    CLUSTERS_PER_EXTENT,
    MAX_BLOB,
    MAX_CONFIGS,
    MAX_DEVICE_SIZE,
    MAX_DEVICES,
    VMSTATE,
    VmaDevice,
    build_extent_header,
    build_header,
    pack_blockinfo,
)

_ZERO_CLUSTER = bytes(CLUSTER_SIZE)


class _Partial:
    """A cluster that records have covered in part so far."""

    __slots__ = ("buf", "filled")

    def __init__(self) -> None:
        self.buf = bytearray(CLUSTER_SIZE)
        self.filled = 0


class VmaWriter:
    """Writes one VMA archive to ``out``; call :meth:`finish` to complete it."""

    def __init__(self, out: SequentialOutput, header: Header) -> None:
        self.out = out
        self.header = header
        self.totals = Totals()
        self.devices: list[Device] = []
        self.configs: list[Config] = []
        self._config_data: list[tuple[str, bytes]] = []
        self._ctime = header.created_ns // 10**9 if header.created_ns else int(time.time())
        self._header_written = False
        self._parts: list[Buf] = []  # the current extent's stored blocks, in order
        self._blocks = 0  # 4 KiB blocks in them
        self._words: list[int] = []
        self._batching = False
        self._partial: dict[tuple[int, int], _Partial] = {}
        self._done: list[int] = []  # clusters written, per device
        self._finished = False

    # -- metadata ----------------------------------------------------------------------

    def add_device(self, name: str, size: int, props: Mapping[str, str] | None = None) -> Device:
        try:
            check_name(name, "device")
        except ArchiveError as e:
            raise InvalidArgument(str(e)) from None
        if any(d.name == name for d in self.devices):
            raise InvalidArgument(f"device name {name!r} is given twice")
        if name == VMSTATE:
            raise InvalidArgument(f"device name {VMSTATE!r} is reserved in VMA for saved RAM")
        if len(self.devices) >= MAX_DEVICES:
            raise InvalidArgument(f"a VMA archive holds at most {MAX_DEVICES} devices")
        if not 0 < size <= MAX_DEVICE_SIZE:
            raise InvalidArgument(f"device {name!r}: {size} bytes cannot be stored in VMA "
                                  f"(1..{MAX_DEVICE_SIZE} bytes)")
        dev = Device(len(self.devices), name, size, dict(props or {}))
        self.devices.append(dev)
        self._done.append(0)
        self._check_header()
        return dev

    def add_config(self, name: str, data: bytes, spec: CompressionSpec) -> Config:
        del spec  # VMA stores configs as they are
        try:
            check_name(name, "config")
        except ArchiveError as e:
            raise InvalidArgument(str(e)) from None
        if any(c.name == name for c in self.configs):
            raise InvalidArgument(f"config name {name!r} is given twice")
        if len(self.configs) >= MAX_CONFIGS:
            raise InvalidArgument(f"a VMA archive holds at most {MAX_CONFIGS} configs")
        if len(data) > MAX_BLOB:
            raise InvalidArgument(f"config {name!r} has {len(data)} bytes: VMA holds at most "
                                  f"{MAX_BLOB} per config")
        cfg = Config(len(self.configs), name, len(data))
        self.configs.append(cfg)
        self._config_data.append((name, bytes(data)))
        self._check_header()
        return cfg

    def _vma_devices(self) -> list[VmaDevice]:
        return [VmaDevice(d.id + 1, d.name, d.size) for d in self.devices]

    def _header_bytes(self) -> bytes:
        return build_header(self.header.uuid, self._ctime, self._vma_devices(),
                            self._config_data)

    def _check_header(self) -> None:
        """Refuse now, before any data, what would not fit in a VMA header."""
        try:
            self._header_bytes()
        except ValueError as e:
            raise InvalidArgument(f"the devices and configs do not fit in a VMA header: {e}"
                                  ) from None

    # -- device data -------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """The payloads written inside stay valid until the block ends (the engine's
        promise, as for ArchiveWriter): the extent refers to them until then. On an
        exception nothing more is written (the archive is incomplete anyway)."""
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
        self._flush()

    #: VMA has no record digests: the engine need not compute them (its extents carry MD5s).
    wants_digest = False

    def write_data(self, device: int, offset: int, length: int, comp: Compression,
                   payload: Buf, body_digest: bytes | None = None) -> None:
        del body_digest
        if comp != Compression.NONE:
            raise ValueError("VMA stores data uncompressed")
        self.totals.data_bytes += length
        self.totals.stored_bytes += length
        self._place(device, offset, memoryview(payload)[:length])
        if not self._batching:
            self._flush()  # ``payload`` is the caller's again once this returns

    def write_zero(self, device: int, offset: int, length: int) -> None:
        self.totals.zero_bytes += length
        self._place(device, offset, None, length)

    def _place(self, device: int, offset: int, data: memoryview | None,
               length: int | None = None) -> None:
        """Put bytes ``[offset, offset+length)`` (``data``, or zeros) of a device in
        clusters: whole ones straight into the extent, parts into their cluster's buffer."""
        size = self.devices[device].size
        n = len(data) if data is not None else (length or 0)
        end = offset + n
        pos = offset
        while pos < end:
            cluster = pos // CLUSTER_SIZE
            cstart = cluster * CLUSTER_SIZE
            cend = min(cstart + CLUSTER_SIZE, size)  # the last one may be short
            stop = min(end, cend)
            piece = data[pos - offset : stop - offset] if data is not None else None
            key = (device, cluster)
            if pos == cstart and stop == cend and key not in self._partial:
                self._cluster(device, cluster, piece)
            else:
                part = self._partial.get(key)
                if part is None:
                    part = self._partial[key] = _Partial()
                if piece is not None:
                    part.buf[pos - cstart : stop - cstart] = piece
                part.filled += stop - pos
                if part.filled == cend - cstart:
                    del self._partial[key]
                    self._cluster(device, cluster, memoryview(part.buf)[: cend - cstart])
            pos = stop

    def _cluster(self, device: int, cluster: int, data: memoryview | None) -> None:
        """Append one whole cluster (``data`` None: all zeros) to the current extent."""
        mask = 0
        if data is not None and not ZEROS.startswith(data):
            if len(data) == CLUSTER_SIZE and not _has_zero_block(data):
                mask = 0xFFFF  # the common case: the whole cluster as it is
                self._parts.append(data)
                self._blocks += 16
            else:
                for b in range(0, len(data), BLOCK_SIZE):
                    block = data[b : b + BLOCK_SIZE]
                    if ZEROS.startswith(block):
                        continue
                    mask |= 1 << (b // BLOCK_SIZE)
                    self._parts.append(block)
                    if len(block) < BLOCK_SIZE:  # the device's last block: padded with zeros
                        self._parts.append(ZEROS[: BLOCK_SIZE - len(block)])
                    self._blocks += 1
        self._words.append(pack_blockinfo(device + 1, cluster, mask))
        self._done[device] += 1
        if len(self._words) == CLUSTERS_PER_EXTENT:
            self._flush()

    def _flush(self) -> None:
        if not self._header_written:
            self._header_written = True
            self.out.write([self._header_bytes()])
        if not self._words:
            return
        head = build_extent_header(self.header.uuid, self._words, self._blocks)
        self.out.write([head, *self._parts])
        self.totals.records += 1
        self._words, self._parts, self._blocks = [], [], 0

    # -- the end -----------------------------------------------------------------------

    def finish(self) -> None:
        """Write the last extent, after checking that every cluster was written once.
        The output is not committed here."""
        if self._finished:
            raise RuntimeError("archive already finished")
        self._finished = True
        if self._partial:
            (dev_id, cluster), _ = next(iter(self._partial.items()))
            raise ArchiveError(f"device {self.devices[dev_id].name!r}: cluster {cluster} was "
                               "only partly backed up: the VMA archive would be incomplete")
        for dev, done in zip(self.devices, self._done, strict=True):
            want = -(-dev.size // CLUSTER_SIZE)
            if done != want:
                raise ArchiveError(f"device {dev.name!r}: {done} of {want} clusters were "
                                   "backed up: the VMA archive would be incomplete")
        self._flush()


def _has_zero_block(data: memoryview) -> bool:
    return any(ZEROS.startswith(data[b : b + BLOCK_SIZE])
               for b in range(0, CLUSTER_SIZE, BLOCK_SIZE))
