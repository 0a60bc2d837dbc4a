"""Structure-aware mutations of archives, for the fuzzer.

Byte-level damage alone (a flipped bit, a cut) mostly stops at the first frame CRC or record
digest: the checks past them, the ones a hostile archive has to get through, are reached only
by archives that are well framed and sealed but wrong inside. So most mutations here work on
records: take the archive apart (leniently: whatever frames parse), change records (drop,
duplicate, reorder, splice from another archive, change one field of a body to a value at a
boundary), and put it together again with :func:`tests.unit.archive_util.assemble`, which
recomputes frame CRCs, digests, the index, the END seal and the footer, so that only the
mutation is left for the reader to find. Some mutations keep one check deliberately broken
(a stale digest, seq, seal or index), and some damage bytes of the framed result, so every
check is reached from both sides.

Everything takes a :class:`random.Random`, so a case is reproducible from its seed.
"""

from __future__ import annotations

import functools
import random
import struct
from dataclasses import replace

import zstandard

from agent.archive.format import (
    FLAG_OPTIONAL,
    FRAME,
    FRAME_MAGIC,
    INDEX_ENTRY,
    MAX_BODY,
    MAX_DATA_LENGTH,
    MAX_DEVICE_SIZE,
    PREAMBLE,
    RecordType,
)
from tests.unit.archive_util import Parts, Rec, assemble

T = RecordType
_DIGEST = 16

# Values at the edges of what the readers check, or that overflow a field's meaning.
_INTERESTING = [
    0, 1, 2, 7, 8, 15, 16, 255, 256, 511, 512, 1023, 1024, 4095, 4096, 65535, 65536,
    0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000,
    MAX_DATA_LENGTH - 1, MAX_DATA_LENGTH, MAX_DATA_LENGTH + 1, MAX_BODY, MAX_BODY + 1,
    MAX_DEVICE_SIZE - 1, MAX_DEVICE_SIZE, MAX_DEVICE_SIZE + 1, 2**64 - 2, 2**64 - 1,
]

# (offset, struct format) of the fixed fields of each record type's body.
_FIELDS: dict[int, list[tuple[int, str]]] = {
    T.HEADER: [(0, "<Q"), (16, "<Q"), (24, "<Q"), (32, "<q"), (40, "<B"), (41, "<B"),
               (42, "<B"), (43, "<B"), (44, "<I"), (48, "<H")],
    T.DEVICE: [(0, "<I"), (4, "<Q"), (12, "<H")],
    T.CONFIG: [(0, "<I"), (4, "<Q"), (12, "<H")],
    T.CONFIG_DATA: [(0, "<I"), (4, "<B"), (5, "<B"), (6, "<H"), (8, "<Q"), (16, "<I"),
                    (20, "<I")],
    T.DATA: [(0, "<I"), (4, "<B"), (5, "<B"), (6, "<H"), (8, "<Q"), (16, "<I"), (20, "<I")],
    T.ZERO: [(0, "<I"), (4, "<I"), (8, "<Q"), (16, "<Q")],
    T.END: [(0, "<Q"), (8, "<Q"), (16, "<Q"), (24, "<Q"), (32, "<I"), (36, "<I")],
}
_INDEX_FIELDS = [(0, "<B"), (1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q"), (16, "<Q"), (24, "<Q")]
_TYPES = [int(t) for t in T] + [0x0000, 0x0005, 0x0012, 0x0021, 0x00FE, 0x0100, 0x7F01, 0xFFFF]


def parse(data: bytes) -> Parts | None:
    """The records of ``data`` as far as their frames parse (magic and length; the CRC and
    digest are not checked, since the archive will be framed anew), and whatever follows
    them as ``tail``. None if not even the preamble is there."""
    if len(data) < PREAMBLE.size:
        return None
    pos = PREAMBLE.size
    recs: list[Rec] = []
    while pos + FRAME.size <= len(data):
        magic, rtype, flags, _seq, body_len, _crc = FRAME.unpack_from(data, pos)
        end = pos + FRAME.size + body_len + _DIGEST
        if magic != FRAME_MAGIC or body_len > MAX_BODY or end > len(data):
            break
        body = data[pos + FRAME.size : pos + FRAME.size + body_len]
        recs.append(Rec(rtype, body, flags, None, None, pos))
        pos = end
        if rtype == T.END:
            break
    return Parts(data[: PREAMBLE.size], recs, data[pos:])


def frame(recs: list[Rec], **kw: object) -> bytes:
    """:func:`assemble`, falling back where a mutant makes a field unrepresentable (no END
    for the footer to point at, totals past 2^64): without the footer, then unsealed."""
    for fallback in ({}, {"footer": False}, {"footer": False, "seal": False}):
        try:
            return assemble(recs, **{**kw, **fallback})  # type: ignore[arg-type]
        except struct.error:
            continue
    return b""


def repair(data: bytes) -> bytes:
    """``data`` framed and sealed anew: whatever a byte-level mutation did to the records'
    contents stays, every CRC, digest, seq, the index, the seal and the footer are made
    right again."""
    parts = parse(data)
    if parts is None or not parts.records:
        return data
    return frame(parts.records, preamble=parts.preamble, seal=True,
                 tail=_padding_only(parts.tail))


def _padding_only(tail: bytes) -> bytes:
    """What ``tail`` held after its footer, if that was padding."""
    rest = tail[48:]
    return rest if not rest.strip(b"\0") else b""


# --- values -------------------------------------------------------------------------------


def _value(rng: random.Random, fmt: str, old: int, pool: list[int]) -> int:
    """A new value for a field: a boundary, a neighbour of the old one, a value another
    record holds (an offset, a length, an id), or anything."""
    bits = struct.calcsize(fmt) * 8
    v: int
    choice = rng.random()
    if choice < 0.35:
        v = rng.choice(_INTERESTING)
    elif choice < 0.6:
        v = old + rng.choice([-1, 1, -512, 512, -4096, 4096, 2**32, -(2**32)])
    elif choice < 0.85 and pool:
        v = rng.choice(pool) + rng.choice([0, 0, 0, -1, 1])
    else:
        v = rng.getrandbits(bits)
    half, whole = 1 << (bits - 1), 1 << bits
    return (v + half) % whole - half if fmt.endswith("q") else v % whole


def _numbers(recs: list[Rec]) -> list[int]:
    """Every fixed-field value in ``recs``: what a crafted record might copy."""
    out: list[int] = []
    for r in recs:
        for off, fmt in _FIELDS.get(r.rtype, []):
            if off + struct.calcsize(fmt) <= len(r.body):
                out.append(struct.unpack_from(fmt, r.body, off)[0])
    return out


def _set_field(rng: random.Random, rec: Rec, pool: list[int]) -> Rec:
    body = bytearray(rec.body)
    if rec.rtype == T.INDEX and len(body) >= INDEX_ENTRY.size:
        entry = rng.randrange(len(body) // INDEX_ENTRY.size) * INDEX_ENTRY.size
        fields = [(entry + off, fmt) for off, fmt in _INDEX_FIELDS]
    else:
        fields = [(off, fmt) for off, fmt in _FIELDS.get(rec.rtype, [])
                  if off + struct.calcsize(fmt) <= len(body)]
    if not fields:  # any aligned integer of the body
        if len(body) < 8:
            return rec
        fields = [(rng.randrange(len(body) - 7), rng.choice(["<B", "<H", "<I", "<Q"]))]
    off, fmt = rng.choice(fields)
    old = struct.unpack_from(fmt, body, off)[0]
    struct.pack_into(fmt, body, off, _value(rng, fmt, old, pool))
    return replace(rec, body=bytes(body))


def _bytes_op(rng: random.Random, buf: bytearray, donor: bytes) -> None:
    """One byte-level change to ``buf``, in place."""
    n = len(buf)
    op = rng.randrange(7)
    at = rng.randrange(n + 1) if n else 0
    if op == 0 and n:
        buf[min(at, n - 1)] ^= 1 << rng.randrange(8)
    elif op == 1:
        buf[at:at] = rng.randbytes(rng.choice([1, 2, 4, 8, 16, 100]))
    elif op == 2:
        del buf[at : at + rng.choice([1, 2, 4, 8, 24, 40, 100, 1000])]
    elif op == 3:
        del buf[at:]
    elif op == 4:
        k = rng.choice([1, 16, 24, 40, 64, 200])
        buf[at:at] = buf[at : at + k]
    elif op == 5 and n >= 8:
        fmt = rng.choice(["<B", "<H", "<I", "<Q"])
        at = rng.randrange(n - struct.calcsize(fmt) + 1)
        struct.pack_into(fmt, buf, at, rng.choice(_INTERESTING) % 2 ** (8 * struct.calcsize(fmt)))
    elif donor:
        s = rng.randrange(len(donor))
        buf[at:at] = donor[s : s + rng.choice([8, 24, 40, 64, 300])]


# --- payloads -----------------------------------------------------------------------------


def _zstd(rng: random.Random, content: bytes, claimed: int | None) -> bytes:
    """A zstd frame of ``content`` whose header states ``claimed`` bytes (None: no size)."""
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=claimed is not None)
    frame = bytearray(cctx.compress(content))
    if claimed is not None and claimed != len(content):
        # Rewrite the frame's content-size field: the frame header's descriptor says how
        # many bytes it has; zstandard writes 1, 2, 4 or 8 (descriptor bits 6-7).
        desc = frame[4]
        fcs_sizes = {0: 1 if desc & 0x20 else 0, 1: 2, 2: 4, 3: 8}
        size = fcs_sizes[desc >> 6]
        at = 5 + (0 if desc & 0x20 else 1) + [0, 1, 2, 4][desc & 3]
        if size == 8 or (size and claimed < 2 ** (8 * size)):
            stored = claimed - 256 if size == 2 else claimed
            frame[at : at + size] = (stored % 2 ** (8 * size)).to_bytes(size, "little")
    return bytes(frame)


@functools.lru_cache(maxsize=64)
def _zeros_frame(size: int, claimed: int) -> bytes:
    """A zstd frame of ``size`` zero bytes that claims ``claimed`` (cached: large ones
    take a while to compress)."""
    return _zstd(random.Random(0), bytes(size), claimed)


def _new_payload(rng: random.Random, rec: Rec) -> Rec:
    """A DATA or CONFIG_DATA record with another payload: compressed or stored, its length
    field matching or not, a zstd frame claiming another size, or a small bomb."""
    if len(rec.body) < 24:
        return rec
    fixed = bytearray(rec.body[:24])
    length = struct.unpack_from("<I", fixed, 16)[0]
    choice = rng.randrange(7)
    n = length if rng.random() < 0.7 else rng.choice([0, 1, max(0, length - 1), length + 1])
    n = min(n, 1 << 16)  # the seeds' records are small; a claimed length may be anything
    content = bytes([rng.randrange(256)]) * n if rng.random() < 0.5 else rng.randbytes(n)
    if choice == 0:  # stored
        fixed[4] = 0
        payload = content
    elif choice == 1:  # compressed, honest
        fixed[4] = 1
        payload = _zstd(rng, content, len(content))
    elif choice == 2:  # compressed, the frame claims another size
        fixed[4] = 1
        payload = _zstd(rng, content, rng.choice([length + 1, max(0, length - 1), 2**32,
                                                   MAX_DATA_LENGTH + 1, 2**63]))
    elif choice == 3:  # compressed, no size in the frame
        fixed[4] = 1
        payload = _zstd(rng, content, None)
    elif choice == 4:  # two frames back to back
        fixed[4] = 1
        half = len(content) // 2
        payload = _zstd(rng, content[:half], half) + _zstd(rng, content[half:], n - half)
    elif choice == 5:  # an honest frame, then more: garbage, a frame, a skippable frame
        fixed[4] = 1
        more = rng.choice([rng.randbytes(rng.choice([1, 8, 40])), _zstd(rng, b"x" * 9, 9),
                           b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd"])
        payload = _zstd(rng, content, len(content)) + more
    else:  # a frame that expands to far more than the record's length says
        fixed[4] = 1
        big = rng.choice([length * 2 + 1, MAX_DATA_LENGTH, MAX_DATA_LENGTH + 1])
        payload = _zeros_frame(big, length)
    if rng.random() < 0.5:
        struct.pack_into("<I", fixed, 16, n if choice == 0 else length)
    return replace(rec, body=bytes(fixed) + payload)


# --- record-level mutations ---------------------------------------------------------------


def _pick(rng: random.Random, recs: list[Rec], types: tuple[int, ...] = ()) -> int | None:
    hits = [i for i, r in enumerate(recs) if not types or r.rtype in types]
    return rng.choice(hits) if hits else None


def mutate_records(rng: random.Random, recs: list[Rec], donor: list[Rec]) -> list[Rec]:
    """One change to the list of records (a new list; the records are not modified)."""
    recs = list(recs)
    if not recs:
        return [replace(r) for r in donor[: rng.randrange(1, 4)]]
    n = len(recs)
    i = rng.randrange(n)
    op = rng.randrange(16)
    if op == 0:
        del recs[i]
    elif op == 1:
        recs.insert(rng.randrange(n + 1), recs[i])
    elif op == 2:
        j = rng.randrange(n)
        recs[i], recs[j] = recs[j], recs[i]
    elif op == 3:
        recs.insert(rng.randrange(n + 1), recs.pop(i))
    elif op == 4 and donor:  # splice a run of another archive's records
        s = rng.randrange(len(donor))
        recs[i:i] = donor[s : s + rng.choice([1, 1, 2, 5])]
    elif op == 5 and donor:  # the same slot filled by another archive's record of that type
        same = [r for r in donor if r.rtype == recs[i].rtype]
        if same:
            recs[i] = rng.choice(same)
    elif op in (6, 7, 8, 9):  # one field of a body set to a boundary or borrowed value
        pool = _numbers(recs) + _numbers(donor)
        prefer = rng.choice([(T.DATA, T.ZERO), (T.DEVICE, T.CONFIG), (T.CONFIG_DATA,),
                             (T.HEADER,), (T.INDEX,), (T.END,), ()])
        k = _pick(rng, recs, prefer)
        k = i if k is None else k
        recs[k] = _set_field(rng, recs[k], pool)
    elif op == 10:
        k = _pick(rng, recs, (T.DATA, T.CONFIG_DATA))
        if k is not None:
            recs[k] = _new_payload(rng, recs[k])
    elif op == 11:  # damage inside a body, digest recomputed
        body = bytearray(recs[i].body)
        _bytes_op(rng, body, b"")
        recs[i] = replace(recs[i], body=bytes(body))
    elif op == 12:  # another type, or flags
        if rng.random() < 0.5:
            recs[i] = replace(recs[i], rtype=rng.choice(_TYPES))
        else:
            recs[i] = replace(recs[i], flags=rng.choice([0, FLAG_OPTIONAL, 2, 3, 0x8000, 0xFFFF]))
    elif op == 13:  # a check deliberately left wrong
        r = recs[i]
        if rng.random() < 0.5:
            recs[i] = replace(r, seq=rng.choice([0, i + 1, max(0, i - 1), 2**64 - 1]))
        else:
            recs[i] = replace(r, digest=bytes(16) if rng.random() < 0.5 else rng.randbytes(16))
    elif op == 14:  # a huge number of tiny ZERO records
        k = _pick(rng, recs, (T.ZERO, T.DATA))
        if k is not None and len(recs[k].body) >= 24:
            dev, _r, off, _len = struct.unpack_from("<IIQQ", recs[k].body)
            many = [Rec(T.ZERO, struct.pack("<IIQQ", dev, 0, (off + j) % 2**64, 1))
                    for j in range(rng.choice([2, 50, 500]))]
            recs[k:k + 1] = many
    else:  # an unknown optional record anywhere
        recs.insert(rng.randrange(n + 1), Rec(rng.choice([0x7F01, 0x0030, 0xFFFF]),
                                             rng.randbytes(rng.choice([0, 8, 40])), FLAG_OPTIONAL))
    return recs


def mutate(rng: random.Random, data: bytes, donor: bytes = b"", max_len: int = 1 << 16) -> bytes:
    """A mutant of ``data``: mostly well-framed and sealed with one thing wrong inside,
    sometimes damaged at the byte level (and sometimes then repaired)."""
    parts = parse(data)
    donor_parts = parse(donor) if donor else None
    donor_recs = donor_parts.records if donor_parts else []
    choice = rng.random()
    if parts is None or not parts.records or choice < 0.2:
        return _bytes_mutant(rng, data, donor, max_len)
    recs = parts.records
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        recs = mutate_records(rng, recs, donor_recs)
    how = rng.random()
    tail = b""
    if how < 0.1:
        tail = bytes(rng.choice([1, 47, 48, 512]))  # tape padding
    elif how < 0.15:
        tail = rng.randbytes(rng.choice([1, 48]))
    out = frame(recs, preamble=_preamble(rng, parts.preamble), seal=how < 0.9,
                keep_index=0.6 < how < 0.75, footer=how < 0.95, tail=tail)
    return out[:max_len]


def _bytes_mutant(rng: random.Random, data: bytes, donor: bytes, max_len: int) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4])):
        _bytes_op(rng, buf, donor)
    out = bytes(buf)
    if rng.random() < 0.3:
        out = repair(out)
    return out[:max_len]


def _preamble(rng: random.Random, preamble: bytes) -> bytes:
    if rng.random() < 0.97:
        return preamble
    buf = bytearray(preamble)
    struct.pack_into("<HHI", buf, 8, rng.choice([1, 2, 0]), rng.choice([0, 1, 0xFFFF]),
                     rng.choice([0, 0, 1]))
    return bytes(buf)


def crossover(rng: random.Random, a: bytes, b: bytes, max_len: int = 1 << 16) -> bytes:
    """Records of ``a`` up to a point, then records of ``b`` from a point, sealed."""
    pa, pb = parse(a), parse(b)
    if pa is None or pb is None or not pa.records or not pb.records:
        return (a[: rng.randrange(len(a) + 1)] + b[rng.randrange(len(b) + 1) :])[:max_len]
    i = rng.randrange(len(pa.records) + 1)
    j = rng.randrange(len(pb.records) + 1)
    return frame(pa.records[:i] + pb.records[j:], preamble=pa.preamble, seal=True)[:max_len]
