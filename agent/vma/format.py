"""Proxmox VMA: byte layout of the header and of the extents (docs/VMA.md).

``Header || Extent*``, no trailer, no index. Integers are big-endian except the 2-byte
blob lengths in the header's blob buffer, which Proxmox's writer stores little-endian
(its reader and the independent readers agree; the spec says big-endian).

Everything here parses hostile input: each field is range-checked before it is used,
and a bad one raises :class:`~agent.errors.ArchiveError` with one line saying what and
where. Nothing is allocated from a size the input claims beyond the bounds below.

::

    header   0 magic "VMA\\0" | 4 version=1 | 8 uuid[16] | 24 ctime | 32 md5[16]
             48 blob_buffer_offset | 52 blob_buffer_size | 56 header_size | 60 reserved
             2044 config_names[256] u32 | 3068 config_data[256] u32 | 4092 reserved
             4096 dev_info[256] x 32: name u32, reserved u32, size u64, reserved[16]
             12288 blob buffer: (u16le length, bytes)*, first blob at offset 1
    extent   0 magic "VMAE" | 4 reserved u16 | 6 block_count u16 | 8 uuid[16]
             24 md5[16] | 40 blockinfo[59] u64: mask<<48 | dev_id<<32 | cluster
             then the stored 4 KiB blocks, in blockinfo order
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from uuid import UUID

from agent.archive.format import check_name
from agent.errors import ArchiveError

MAGIC = b"VMA\0"
EXTENT_MAGIC = b"VMAE"
VERSION = 1
BLOCK_SIZE = 4096
BLOCKS_PER_CLUSTER = 16
CLUSTER_SIZE = BLOCK_SIZE * BLOCKS_PER_CLUSTER  # 64 KiB
EXTENT_HEADER_SIZE = 512
CLUSTERS_PER_EXTENT = 59
MAX_EXTENT_SIZE = EXTENT_HEADER_SIZE + CLUSTERS_PER_EXTENT * CLUSTER_SIZE
MAX_CONFIGS = 256
MAX_DEVICES = 255  # dev_id 1..255; 0 marks an unused slot
MAX_BLOB = 65535
#: A device holds at most 2^32 clusters (cluster numbers are 32 bits): 256 TiB.
MAX_DEVICE_SIZE = (1 << 32) * CLUSTER_SIZE
FIXED_HEADER_SIZE = 12288  # sizeof(VmaHeader): the blob buffer starts here
#: Proxmox's writer keeps the whole header in 8 clusters (HEADERBUF_SIZE): it writes no
#: larger one, and we read none larger (a hostile header_size allocates no more).
MAX_HEADER_SIZE = 8 * CLUSTER_SIZE
VMSTATE = "vmstate"  # the device name vzdump gives saved RAM

_FIXED = struct.Struct(">4sI16sq16sIII")  # magic .. header_size (60 bytes)
_MD5_AT = 32
_CONFIG_NAMES_AT = 2044
_CONFIG_DATA_AT = 3068
_DEV_INFO_AT = 4096
_DEV_INFO = struct.Struct(">IIQ16x")
_EXTENT = struct.Struct(">4sHH16s16s")  # 40 bytes, then blockinfo
_BLOCKINFO = struct.Struct(">59Q")
_EXTENT_MD5_AT = 24


def md5(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


@dataclass(frozen=True)
class VmaDevice:
    dev_id: int  # 1..255
    name: str
    size: int

    @property
    def clusters(self) -> int:
        return -(-self.size // CLUSTER_SIZE)


@dataclass(frozen=True)
class VmaHeader:
    uuid: UUID
    ctime: int  # seconds since the epoch
    devices: list[VmaDevice] = field(default_factory=list)  # by dev_id, ascending
    configs: list[tuple[str, bytes]] = field(default_factory=list)  # in header order
    header_size: int = 0
    md5: bytes = bytes(16)


def header_size_of(prefix: bytes | bytearray | memoryview) -> int:
    """The whole header's size, from its first 60 bytes: checked before it is read."""
    if len(prefix) < _FIXED.size or bytes(prefix[:4]) != MAGIC:
        raise ArchiveError("not a VMA archive (wrong magic number)")
    version = struct.unpack_from(">I", prefix, 4)[0]
    if version != VERSION:
        raise ArchiveError(f"VMA version {version} is not supported (only version 1)")
    size = struct.unpack_from(">I", prefix, 56)[0]
    if not FIXED_HEADER_SIZE < size <= MAX_HEADER_SIZE:
        raise ArchiveError(f"VMA header size {size} is out of range "
                           f"({FIXED_HEADER_SIZE + 1}..{MAX_HEADER_SIZE})")
    return int(size)


def _blobs(head: bytes, offset: int, size: int) -> dict[int, bytes]:
    """The blob buffer's blobs, by their offset in it."""
    start, end = offset + 1, offset + size
    if start <= FIXED_HEADER_SIZE or end > len(head):
        raise ArchiveError(f"VMA header: blob buffer {offset}+{size} lies outside the header "
                           f"({FIXED_HEADER_SIZE}..{len(head)})")
    out = {}
    pos = start
    while pos + 2 <= end:
        n = head[pos] | head[pos + 1] << 8  # little-endian, as Proxmox writes it
        if pos + 2 + n > end:
            break  # the writer's zero padding, or a blob cut short: never referenced
        out[pos - offset] = head[pos + 2 : pos + 2 + n]
        pos += 2 + n
    return out


def _string(blobs: dict[int, bytes], ptr: int, what: str) -> str:
    blob = blobs.get(ptr)
    if blob is None or not blob or blob[-1] != 0:
        raise ArchiveError(f"VMA header: {what} points to no NUL-terminated string "
                           f"(blob offset {ptr})")
    try:
        text = blob[:-1].decode()
    except UnicodeDecodeError:
        raise ArchiveError(f"VMA header: {what} is not UTF-8 (blob offset {ptr})") from None
    # Names become file names on restore: the same rule as our own archives' (no "/",
    # no "..": vzdump's drive-scsi0, qemu-server.conf and the like all pass).
    try:
        check_name(text, "name")
    except ArchiveError as e:
        rule = str(e).split("is not allowed: ", 1)[-1]
        raise ArchiveError(f"VMA header: {what} {text!r} is not allowed as a file name: "
                           f"{rule}") from None
    return text


def parse_header(head: bytes) -> VmaHeader:
    """Check and decode a complete header (``header_size_of`` bytes)."""
    size = header_size_of(head)
    if len(head) != size:
        raise ArchiveError(f"VMA header is truncated: {len(head)} of {size} bytes")
    _, _, uuid, ctime, digest, boff, bsize, _ = _FIXED.unpack_from(head)
    zeroed = bytearray(head)
    zeroed[_MD5_AT : _MD5_AT + 16] = bytes(16)
    if md5(zeroed) != digest:
        raise ArchiveError("VMA header fails its MD5 checksum: the archive is damaged")
    blobs = _blobs(head, boff, bsize)
    devices = []
    names: set[str] = set()
    for dev_id in range(1, MAX_DEVICES + 1):
        ptr, _, dsize = _DEV_INFO.unpack_from(head, _DEV_INFO_AT + 32 * dev_id)
        if not dsize or not ptr:
            continue  # an unused slot, as Proxmox's reader skips it
        name = _string(blobs, ptr, f"device {dev_id}'s name")
        if dsize > MAX_DEVICE_SIZE:
            raise ArchiveError(f"VMA header: device {name!r} claims {dsize} bytes, over the "
                               f"format's {MAX_DEVICE_SIZE}")
        if name in names:
            raise ArchiveError(f"VMA header: device name {name!r} appears twice")
        names.add(name)
        devices.append(VmaDevice(dev_id, name, dsize))
    configs = []
    cnames: set[str] = set()
    for i in range(MAX_CONFIGS):
        nptr = struct.unpack_from(">I", head, _CONFIG_NAMES_AT + 4 * i)[0]
        dptr = struct.unpack_from(">I", head, _CONFIG_DATA_AT + 4 * i)[0]
        if not (nptr and dptr):
            continue
        name = _string(blobs, nptr, f"config {i}'s name")
        data = blobs.get(dptr)
        if data is None:
            raise ArchiveError(f"VMA header: config {name!r} points to no blob "
                               f"(blob offset {dptr})")
        if name in cnames:
            raise ArchiveError(f"VMA header: config name {name!r} appears twice")
        cnames.add(name)
        configs.append((name, data))
    return VmaHeader(UUID(bytes=uuid), ctime, devices, configs, size, digest)


def build_header(uuid: UUID, ctime: int, devices: list[VmaDevice],
                 configs: list[tuple[str, bytes]]) -> bytes:
    """A header as Proxmox's writer lays it out: configs' names and data, then device
    names, in the blob buffer; sizes rounded up to 512 bytes; MD5 over all of it."""
    table = bytearray(b"\0")  # offset 0 means "none": the first blob sits at 1

    def blob(data: bytes) -> int:
        if len(data) > MAX_BLOB:
            raise ValueError(f"blob of {len(data)} bytes is over {MAX_BLOB}")
        pos = len(table)
        table.extend(len(data).to_bytes(2, "little"))
        table.extend(data)
        return pos

    head = bytearray(FIXED_HEADER_SIZE)
    for i, (name, data) in enumerate(configs):
        struct.pack_into(">I", head, _CONFIG_NAMES_AT + 4 * i, blob(name.encode() + b"\0"))
        struct.pack_into(">I", head, _CONFIG_DATA_AT + 4 * i, blob(data))
    for dev in devices:
        _DEV_INFO.pack_into(head, _DEV_INFO_AT + 32 * dev.dev_id,
                            blob(dev.name.encode() + b"\0"), 0, dev.size)
    used = len(table)
    table.extend(bytes(-len(table) % 512))
    size = FIXED_HEADER_SIZE + len(table)
    if size > MAX_HEADER_SIZE:
        raise ValueError(f"the VMA header would be {size} bytes, over {MAX_HEADER_SIZE}")
    _FIXED.pack_into(head, 0, MAGIC, VERSION, uuid.bytes, ctime, bytes(16),
                     FIXED_HEADER_SIZE, used, size)
    head += table
    head[_MD5_AT : _MD5_AT + 16] = md5(head)
    return bytes(head)


@dataclass(frozen=True)
class BlockInfo:
    dev_id: int
    cluster: int
    mask: int  # bit i: 4 KiB block i of the cluster is stored (not all zeros)

    @property
    def blocks(self) -> int:
        return self.mask.bit_count()


def pack_blockinfo(dev_id: int, cluster: int, mask: int) -> int:
    return mask << 48 | dev_id << 32 | cluster


@dataclass(frozen=True)
class ExtentHeader:
    block_count: int
    infos: list[BlockInfo]  # used slots only, in order

    @property
    def data_size(self) -> int:
        return self.block_count * BLOCK_SIZE


def parse_extent_header(buf: bytes | bytearray | memoryview, uuid: UUID,
                        pos: int) -> ExtentHeader:
    """Check and decode a 512-byte extent header read at archive byte ``pos``."""
    magic, reserved, count, euuid, digest = _EXTENT.unpack_from(buf)
    if magic != EXTENT_MAGIC:
        raise ArchiveError(f"VMA extent at byte {pos} has a wrong magic number: the archive "
                           "is damaged, or something else follows it")
    zeroed = bytearray(buf[:EXTENT_HEADER_SIZE])
    zeroed[_EXTENT_MD5_AT : _EXTENT_MD5_AT + 16] = bytes(16)
    if md5(zeroed) != digest:
        raise ArchiveError(f"VMA extent at byte {pos} fails its MD5 checksum: the archive "
                           "is damaged")
    if reserved != 0:
        raise ArchiveError(f"VMA extent at byte {pos} has non-zero reserved bits")
    if euuid != uuid.bytes:
        raise ArchiveError(f"VMA extent at byte {pos} belongs to another archive "
                           f"({UUID(bytes=euuid)}, not {uuid})")
    infos = []
    total = 0
    for word in _BLOCKINFO.unpack_from(buf, _EXTENT.size):
        dev_id = word >> 32 & 0xFF
        if not dev_id:
            continue
        if word >> 40 & 0xFF:
            raise ArchiveError(f"VMA extent at byte {pos} has non-zero reserved bits")
        info = BlockInfo(dev_id, word & 0xFFFFFFFF, word >> 48)
        total += info.blocks
        infos.append(info)
    if total != count:
        raise ArchiveError(f"VMA extent at byte {pos} says {count} blocks follow, its "
                           f"clusters' masks hold {total}")
    return ExtentHeader(count, infos)


def build_extent_header(uuid: UUID, words: list[int], block_count: int) -> bytearray:
    """A 512-byte extent header for ``words`` (packed blockinfo, at most 59)."""
    head = bytearray(EXTENT_HEADER_SIZE)
    _EXTENT.pack_into(head, 0, EXTENT_MAGIC, 0, block_count, uuid.bytes, bytes(16))
    _BLOCKINFO.pack_into(head, _EXTENT.size, *words, *([0] * (CLUSTERS_PER_EXTENT - len(words))))
    head[_EXTENT_MD5_AT : _EXTENT_MD5_AT + 16] = md5(head)
    return head
