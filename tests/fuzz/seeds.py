"""Valid archives the fuzzer starts from: small (a few KiB, so that each case is fast; one of
600 KiB for the reader's path for large records) but between them holding every kind of
record and most header fields a reader looks at.

Each is built with the real writer, deterministically: the same bytes on every run, so a
corpus or a reproducer saved by one run means the same on the next.
"""

from __future__ import annotations

import itertools
import struct
import uuid
import zlib
from collections.abc import Callable

from agent.archive import codec
from agent.archive.codec import CompressionSpec
from agent.archive.format import Header, Kind
from agent.archive.writer import ArchiveWriter
from tests.unit.archive_util import Rec, assemble, renumber, split, write_archive

FULL_UUID = uuid.UUID("01900000-0000-7000-8000-00000000f011")
INC_UUID = uuid.UUID("01900000-0000-7000-8000-0000000001c1")
DIFF_UUID = uuid.UUID("01900000-0000-7000-8000-00000000d1ff")
ZSTD = CompressionSpec()
NONE = CompressionSpec.parse("none")


def _pattern(tag: int, n: int) -> bytes:
    """Compressible but not constant bytes, different for each ``tag``."""
    line = f"seed {tag:04d} ".encode() * 8
    return (line * (n // len(line) + 1))[:n]


def _noise(tag: int, n: int) -> bytes:
    """Incompressible bytes (zstd stores them: compression falls back to none)."""
    out = bytearray()
    x = tag
    while len(out) < n:
        x = zlib.crc32(x.to_bytes(8, "little"))
        out += x.to_bytes(4, "little")
    return bytes(out[:n])


def _data(w: ArchiveWriter, dev: int, off: int, data: bytes, spec: CompressionSpec) -> None:
    comp, payload = codec.compress(data, spec)
    w.write_data(dev, off, len(data), comp, payload)


def _full(w: ArchiveWriter) -> None:
    """Two devices, one config, zstd and stored records out of order, zero ranges."""
    vda = w.add_device("vda", 4096, {"format": "qcow2", "bus": "virtio"})
    vdb = w.add_device("vdb", 1536)
    w.add_config("vm.conf", b"cpus=2\nmemory=1G\n" * 4, ZSTD)
    _data(w, vda.id, 2048, _pattern(1, 1024), ZSTD)
    _data(w, vdb.id, 0, _noise(2, 512), ZSTD)
    w.write_zero(vda.id, 0, 1024)
    _data(w, vda.id, 1024, _noise(3, 1024), ZSTD)
    w.write_zero(vdb.id, 512, 1024)
    w.write_zero(vda.id, 3072, 1024)


def _stored(w: ArchiveWriter) -> None:
    """No compression; three configs (one empty, one in two chunks is too large for a seed,
    so two small ones); three devices, one of them empty; a long name."""
    w.add_config("libvirt.xml", b"<domain type='kvm'><name>vm</name></domain>\n", NONE)
    w.add_config("empty.cfg", b"", NONE)
    w.add_config("qemu.args", b"-m 1G -smp 2", NONE)
    a = w.add_device("disk-0.raw", 1024)
    w.add_device("empty", 0)
    c = w.add_device("x" * 40 + ".img", 512, {"serial": "S1", "": ""})
    _data(w, a.id, 512, _pattern(4, 512), NONE)
    _data(w, c.id, 0, _pattern(5, 512), NONE)
    _data(w, a.id, 0, _pattern(6, 512), NONE)


def _incremental(w: ArchiveWriter) -> None:
    """Changes only: gaps between the ranges, a zeroed range, the full's device names."""
    vda = w.add_device("vda", 4096, {"format": "qcow2", "bus": "virtio"})
    w.add_device("vdb", 1536)
    _data(w, vda.id, 3072, _pattern(7, 512), ZSTD)
    w.write_zero(vda.id, 0, 512)
    _data(w, vda.id, 1024, _pattern(8, 256), NONE)


def _differential(w: ArchiveWriter) -> None:
    vda = w.add_device("vda", 4096)
    w.add_device("vdb", 1536)
    w.add_config("vm.conf", b"cpus=4\n", ZSTD)
    _data(w, vda.id, 512, _pattern(9, 1536), ZSTD)


def _large(w: ArchiveWriter) -> None:
    """Stored records past 256 KiB, which the reader reads straight into their own buffer
    instead of through its read-ahead, between small ones (the switch between the two)."""
    vda = w.add_device("vda", 1 << 20)
    _data(w, vda.id, 0, _noise(10, 300 * 1024), NONE)
    _data(w, vda.id, 300 * 1024, _pattern(11, 4096), ZSTD)
    w.write_zero(vda.id, 304 * 1024, 100 * 1024)
    _data(w, vda.id, 404 * 1024, _noise(12, 260 * 1024), NONE)
    _data(w, vda.id, 664 * 1024, _noise(13, 1024), NONE)
    w.write_zero(vda.id, 665 * 1024, (1 << 20) - 665 * 1024)


def _chunked_config(data: bytes) -> bytes:
    """A config in three CONFIG_DATA chunks (the writer cuts at 4 MiB, too large for a
    seed; readers accept any chunk length), so chunks can be dropped and reordered."""
    recs = renumber(split(data).records)
    at = next(i for i, r in enumerate(recs) if r.rtype == 0x04 and len(r.body) > 30)
    head, payload = recs[at].body[:24], recs[at].body[24:]
    cfg = struct.unpack_from("<I", head)[0]  # stored (STORED has no compression)
    cuts = [0, 10, 25, len(payload)]
    chunks = [Rec(0x04, struct.pack("<IBBHQII", cfg, 0, 0, 0, a, b - a, 0) + payload[a:b])
              for a, b in itertools.pairwise(cuts)]
    return assemble([*recs[:at], *chunks, *recs[at + 1 :]], seal=True)


def _build(build: Callable[[ArchiveWriter], None], header: Header) -> bytes:
    return write_archive(build, header)


FULL = _build(_full, Header(FULL_UUID, 1_700_000_000_000_000_000, "seed-1",
                            checkpoint="ba-full", props={"vm": "seed", "host": "h1"}))
STORED = _build(_stored, Header(uuid.UUID(int=0x5EED), 1, "seed-2"))
INCREMENTAL = _build(_incremental, Header(INC_UUID, 1_700_000_100_000_000_000, "seed-3",
                                          kind=Kind.INCREMENTAL, parent_uuid=FULL_UUID,
                                          checkpoint="ba-inc"))
DIFFERENTIAL = _build(_differential, Header(DIFF_UUID, 1_700_000_200_000_000_000, "seed-4",
                                            kind=Kind.DIFFERENTIAL, parent_uuid=FULL_UUID))


def _without_index(data: bytes) -> bytes:
    """The same archive without INDEX records (valid: readers must not require them)."""
    parts = split(data)
    return assemble(renumber([r for r in parts.records if r.rtype != 0x20]), seal=True)


def _with_unknown_optional(data: bytes) -> bytes:
    """An optional record of a type this version does not know, before the data (a newer
    minor version may write one; readers skip it)."""
    recs = renumber(split(data).records)
    at = next(i for i, r in enumerate(recs) if r.rtype in (0x10, 0x11))
    extra = Rec(0x7F01, b"a later minor version's record", flags=1)
    return assemble([*recs[:at], extra, *recs[at:]], seal=True)


SEEDS: dict[str, bytes] = {
    "full": FULL,
    "stored": STORED,
    "incremental": INCREMENTAL,
    "differential": DIFFERENTIAL,
    "full-padded": FULL + bytes(100),  # a tape drive's zero padding
    "no-index": _without_index(STORED),
    "optional-record": _with_unknown_optional(INCREMENTAL),
    "chunked-config": _chunked_config(STORED),
    "large-records": _build(_large, Header(uuid.UUID(int=0x1A56E), 2, "seed-5")),
}
