"""Build ``tiny.vma.hex`` from vma_spec.txt by hand: plain struct and hashlib, nothing of
agent/vma/, so the fixture checks our reader against the spec rather than our writer.

Run ``python -m tests.data.vma.make_tiny`` to rebuild it; README.md explains every byte.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

UUID = bytes(range(0x10, 0x20))
CTIME = 1_700_000_000
SIZE = 2 * 65536 + 8192  # 3 clusters, the last one 2 blocks long
CONFIG = b"memory: 512\nscsi0: local:vm-100-disk-0,size=136K\n"


def blob_table() -> tuple[bytes, int, int, int]:
    table = bytearray(b"\0")  # offset 0 means "none"
    offsets = []
    for data in (b"qemu-server.conf\0", CONFIG, b"drive-scsi0\0"):
        offsets.append(len(table))
        table += struct.pack("<H", len(data)) + data  # little-endian length, as Proxmox
    return bytes(table), *offsets  # type: ignore[return-value]


def header() -> bytes:
    table, name_ptr, data_ptr, dev_ptr = blob_table()
    used = len(table)
    table += bytes(-len(table) % 512)
    head = bytearray(12288)
    struct.pack_into(">4sI16sq16sIII", head, 0, b"VMA\0", 1, UUID, CTIME, bytes(16),
                     12288, used, 12288 + len(table))
    struct.pack_into(">I", head, 2044, name_ptr)  # config_names[0]
    struct.pack_into(">I", head, 3068, data_ptr)  # config_data[0]
    struct.pack_into(">IIQ", head, 4096 + 32 * 1, dev_ptr, 0, SIZE)  # dev_info[1]
    head += table
    head[32:48] = hashlib.md5(head).digest()
    return bytes(head)


def extent(infos: list[tuple[int, int, int]], blocks: list[bytes]) -> bytes:
    head = bytearray(512)
    struct.pack_into(">4sHH16s16s", head, 0, b"VMAE", 0, len(blocks), UUID, bytes(16))
    for i, (mask, dev, cluster) in enumerate(infos):
        struct.pack_into(">Q", head, 40 + 8 * i, mask << 48 | dev << 32 | cluster)
    head[24:40] = hashlib.md5(head).digest()
    return bytes(head) + b"".join(blocks)


def archive() -> bytes:
    # Extent 1: cluster 1 with blocks 0 and 2 stored, then cluster 0 all zeros.
    e1 = extent([(0b101, 1, 1), (0, 1, 0)], [b"\xa1" * 4096, b"\xa2" * 4096])
    # Extent 2: the last cluster (2 blocks long), its block 1 stored.
    e2 = extent([(0b10, 1, 2)], [b"\xa3" * 4096])
    return header() + e1 + e2


def expected_disk() -> bytes:
    disk = bytearray(SIZE)
    disk[65536 : 65536 + 4096] = b"\xa1" * 4096
    disk[65536 + 8192 : 65536 + 12288] = b"\xa2" * 4096
    disk[131072 + 4096 : 131072 + 8192] = b"\xa3" * 4096
    return bytes(disk)


def to_hex(data: bytes) -> str:
    """One line per 16-byte row that is not all zeros: ``OFFSET HEX``; the last line gives
    the length. Zero rows are left out (the header is mostly zeros)."""
    lines = [f"{off:06x} {data[off:off + 16].hex(' ')}" for off in range(0, len(data), 16)
             if any(data[off:off + 16])]
    return "\n".join([*lines, f"length {len(data)}"]) + "\n"


def from_hex(text: str) -> bytes:
    rows = text.split("\n")
    out = bytearray(int(rows[-2].split()[1]))
    for row in rows[:-2]:
        off, _, hexes = row.partition(" ")
        piece = bytes.fromhex(hexes)
        out[int(off, 16) : int(off, 16) + len(piece)] = piece
    return bytes(out)


HERE = Path(__file__).parent

if __name__ == "__main__":
    (HERE / "tiny.vma.hex").write_text(to_hex(archive()))
