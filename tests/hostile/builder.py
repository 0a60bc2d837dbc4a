"""Crafted hostile archives: valid in every respect except one attack.

Each ``attack`` function below returns the bytes of a whole archive whose frame CRCs,
record digests, sequence numbers, INDEX records (65,536 entries per record, as the writer
makes them), END seal and footer are all right, so that a reader gets past every checksum
and meets only the one thing the function is about. Their docstrings say whether
``backup-agent verify`` accepts the result (it is a valid archive that is merely
expensive or odd) or which check refuses it; tests/unit/test_hostile_builder.py shows it.

To build something else, make record bodies with :func:`header`, :func:`device`,
:func:`config`, :func:`config_data`, :func:`data` and :func:`zero` (they take raw values:
names as bytes, sizes past the limits, any compression byte), put them in a list of
:class:`Record` after one HEADER and give it to :func:`seal`::

    from tests.hostile import builder as hb

    arc = hb.seal([hb.Record(hb.T.HEADER, hb.header()),
                   hb.Record(hb.T.DEVICE, hb.device(0, 1 << 20, "vda")),
                   hb.Record(hb.T.ZERO, hb.zero(0, 0, 1 << 20))])

Sizes are parameters: the defaults keep each archive small enough for a unit test (a few
MiB at most); the attacks scale by raising them.
"""

from __future__ import annotations

import functools
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import zstandard

from agent.archive.format import (
    FLAG_OPTIONAL,
    INDEX_ENTRIES_PER_RECORD,
    INDEX_ENTRY,
    MAX_DATA_LENGTH,
    MAX_DEVICE_SIZE,
    NO_INDEX,
    Compression,
    End,
    Footer,
    Kind,
    RecordType,
)
from tests.unit.archive_util import Framer

T = RecordType
ARCHIVE_UUID = uuid.UUID("01900000-0000-7000-8000-0000000ba11d")
PARENT_UUID = uuid.UUID("01900000-0000-7000-8000-00000000a5e7")

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_CHUNK = struct.Struct("<IBBHQII")  # id, compression, 0, 0, offset, length, 0
_ZERO = struct.Struct("<IIQQ")


@dataclass(frozen=True)
class Record:
    """One record to frame: its type, its body, and its frame flags."""

    rtype: int
    body: bytes
    flags: int = 0


# --- record bodies ------------------------------------------------------------------------


def _text(raw: bytes | str) -> bytes:
    b = raw.encode() if isinstance(raw, str) else raw
    return _U16.pack(len(b)) + b


def _props(props: Mapping[bytes | str, bytes | str]) -> bytes:
    out = [_U16.pack(len(props))]
    for k, v in props.items():
        val = v.encode() if isinstance(v, str) else v
        out += [_text(k), _U32.pack(len(val)), val]
    return b"".join(out)


def header(*, kind: Kind = Kind.FULL, parent: uuid.UUID | None = None,
           archive: uuid.UUID = ARCHIVE_UUID, created_ns: int = 1_700_000_000_000_000_000,
           tool_version: bytes | str = "hostile-1", checkpoint: bytes | str = "",
           props: Mapping[bytes | str, bytes | str] | None = None) -> bytes:
    """A HEADER body; strings may be raw bytes (not UTF-8, control characters, 64 KiB)."""
    if parent is None and kind != Kind.FULL:
        parent = PARENT_UUID
    fixed = struct.pack("<16s16sqBBBBI", archive.bytes, parent.bytes if parent else bytes(16),
                        created_ns, kind, 0, 1, 0, 0)
    return fixed + _text(tool_version) + _text(checkpoint) + _U32.pack(0) + _props(props or {})


def device(dev_id: int, size: int, name: bytes | str,
           props: Mapping[bytes | str, bytes | str] | None = None) -> bytes:
    """A DEVICE body: any id, any u64 size, any name bytes."""
    return struct.pack("<IQ", dev_id, size) + _text(name) + _props(props or {})


def config(cfg_id: int, size: int, name: bytes | str) -> bytes:
    """A CONFIG body."""
    return struct.pack("<IQ", cfg_id, size) + _text(name)


def data(dev_id: int, offset: int, payload: bytes, *, length: int | None = None,
         compression: int = Compression.NONE) -> bytes:
    """A DATA body: ``payload`` as stored (compressed already if ``compression`` is zstd);
    ``length`` (the device bytes it stands for) defaults to ``len(payload)``."""
    n = len(payload) if length is None else length
    return _CHUNK.pack(dev_id, compression, 0, 0, offset, n, 0) + payload


def config_data(cfg_id: int, offset: int, payload: bytes, *, length: int | None = None,
                compression: int = Compression.NONE) -> bytes:
    """A CONFIG_DATA body (the same layout as DATA)."""
    return data(cfg_id, offset, payload, length=length, compression=compression)


def zero(dev_id: int, offset: int, length: int) -> bytes:
    """A ZERO body."""
    return _ZERO.pack(dev_id, 0, offset, length)


@functools.lru_cache(maxsize=16)
def zstd_zeros(length: int) -> bytes:
    """One zstd frame of ``length`` zero bytes that states its content size, as the format
    requires: a few bytes per MiB (cached; compressing 32 MiB takes a moment)."""
    return bytes(zstandard.ZstdCompressor(level=3, write_content_size=True).compress(
        bytes(length)))


# --- framing and sealing ------------------------------------------------------------------


def seal(records: Iterable[Record], *, padding: int = 0, index: bool = True) -> bytes:
    """Frame ``records`` (HEADER first) into a complete archive, as an honest writer would:
    seq numbers, frame CRCs and digests; INDEX records listing every DATA and ZERO record
    (``index``); END with the counts, totals and chained digest; the footer; then
    ``padding`` zero bytes (tape padding)."""
    framer = Framer()
    out, put = framer.out, framer.put
    entries = bytearray()
    totals = {"data": 0, "zero": 0, "stored": 0, "devices": 0, "configs": 0}

    for r in records:
        pos = put(r.rtype, r.body, r.flags)
        if r.rtype == T.DEVICE:
            totals["devices"] += 1
        elif r.rtype == T.CONFIG:
            totals["configs"] += 1
        elif r.rtype == T.DATA:
            dev, comp, _a, _b, off, length, _c = _CHUNK.unpack_from(r.body)
            totals["data"] += length
            totals["stored"] += len(r.body) - _CHUNK.size
            entries += INDEX_ENTRY.pack(T.DATA & 0xFF, comp, 0, dev, off, length, pos)
        elif r.rtype == T.ZERO:
            dev, _r, off, length = _ZERO.unpack_from(r.body)
            totals["zero"] += length
            entries += INDEX_ENTRY.pack(T.ZERO & 0xFF, 0, 0, dev, off, length, pos)
    index_pos = NO_INDEX
    step = INDEX_ENTRIES_PER_RECORD * INDEX_ENTRY.size
    for at in range(0, len(entries) if index else 0, step):
        pos = put(T.INDEX, bytes(entries[at : at + step]), FLAG_OPTIONAL)
        index_pos = pos if index_pos == NO_INDEX else index_pos
    end = End(framer.seq, totals["data"], totals["zero"], totals["stored"], totals["devices"],
              totals["configs"], framer.chain.value())
    end_pos = put(T.END, end.encode())
    out += Footer(index_pos, end_pos, len(out) + 48).encode()
    out += bytes(padding)
    return bytes(out)


def _archive(devices: Sequence[tuple[bytes | str, int]], body: Iterable[Record], *,
             kind: Kind = Kind.FULL, **head: object) -> bytes:
    recs = [Record(T.HEADER, header(kind=kind, **head))]  # type: ignore[arg-type]
    recs += [Record(T.DEVICE, device(i, size, name)) for i, (name, size) in enumerate(devices)]
    return seal([*recs, *body])


# --- attacks ------------------------------------------------------------------------------


def many_tiny_records(count: int = 100_000, *, data_records: bool = False) -> bytes:
    """A FULL archive of one device of ``count`` bytes stored as ``count`` records of one
    byte each (ZERO records, or stored DATA records with ``data_records``), in an order
    that never lets two adjacent ranges arrive one after the other (the even offsets, then
    the odd ones), so a reader's set of covered ranges grows to ``count / 2`` runs before
    they merge. ``verify`` accepts it: it costs a reader 64 bytes of archive (ZERO)
    or 41 (DATA) per device byte, and an index of 32 bytes per record."""
    order = [*range(0, count, 2), *range(1, count, 2)]

    def rec(off: int) -> Record:
        if data_records:
            return Record(T.DATA, data(0, off, bytes([off % 251 + 1])))
        return Record(T.ZERO, zero(0, off, 1))

    return _archive([("tiny", count)], (rec(o) for o in order))


def huge_device(size: int = MAX_DEVICE_SIZE, *, devices: int = 1) -> bytes:
    """A FULL archive of ``devices`` devices of ``size`` bytes each (2^63-1, the format's
    limit, by default), every one covered by a single ZERO record: 8 EiB per 64 bytes of
    archive. ``verify`` accepts it; a restore must make a sparse target of that size or
    refuse it clearly. ``size`` past 2^63-1 is refused ("claims a size"). The END totals
    are u64, so all devices together hold at most 2^64-1 bytes: ``devices=2`` at most at
    the largest size (:func:`seal` raises struct.error past that, as the writer would)."""
    devs = [(f"huge{i}", size) for i in range(devices)]
    return _archive(devs, (Record(T.ZERO, zero(i, 0, size)) for i in range(devices)))


def odd_name(name: bytes | str, *, where: str = "device") -> bytes:
    """A FULL archive whose one device (``where="device"``) or config (``"config"``) is
    named ``name``, raw: control characters, ``/``, ``..``, a leading ``-``, non-UTF-8,
    256 bytes. A reader refuses every name outside ``[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}``
    ("name ... is not allowed", or "a name of N bytes (limit 255)" past 255 bytes, or "not
    UTF-8"); ``long_name()`` is the longest it accepts."""
    if where == "device":
        return _archive([(name, 512)], [Record(T.ZERO, zero(0, 0, 512))])
    return seal([Record(T.HEADER, header()), Record(T.CONFIG, config(0, 3, name)),
                 Record(T.CONFIG_DATA, config_data(0, 0, b"abc"))])


def long_name(length: int = 255) -> bytes:
    """A FULL archive whose device has the longest name a reader accepts (255 bytes of
    name characters): restore makes files named after it, so a 255-byte name plus the
    ``.raw`` suffix is one a file system may refuse. ``verify`` accepts it."""
    return odd_name("d" * length)


def descending_ranges(count: int = 1000, *, length: int = 4096, gap: int = 4096,
                      kind: Kind = Kind.INCREMENTAL) -> bytes:
    """An INCREMENTAL archive of one device whose ``count`` DATA records of ``length``
    bytes come from the device's end backwards, with ``gap`` bytes never covered between
    them: every insertion lands before every range seen so far (the costly end of a
    sorted list) and nothing ever merges. ``verify`` accepts it; with ``kind=FULL`` it
    is refused for its gaps ("missing from this full backup") unless ``gap`` is 0."""
    stride = length + gap
    size = count * stride
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    recs = (Record(T.DATA, data(0, (count - 1 - i) * stride, payload)) for i in range(count))
    return _archive([("vda", size)], recs, kind=kind)


def large_index(entries: int = 200_000) -> bytes:
    """A FULL archive of one device covered by ``entries`` ZERO records of 4 KiB in
    ascending order: its index is ``entries`` x 32 bytes, in INDEX records of 65,536
    entries (2 MiB) each, as the writer splits it, which a random-access reader (``info``
    on a file) reads whole. ``verify`` accepts it."""
    return _archive([("vda", entries * 4096)],
                    (Record(T.ZERO, zero(0, i * 4096, 4096)) for i in range(entries)))


def config_bomb(chunks: int = 4, *, chunk: int = MAX_DATA_LENGTH) -> bytes:
    """A FULL archive with one config of ``chunks`` x ``chunk`` bytes (128 MiB by default)
    held in CONFIG_DATA records of zstd frames of zeros that state their content size
    honestly: a few KiB of archive. ``verify`` accepts it (it decompresses one chunk at a
    time and keeps none); ``config`` and anything that keeps configs in memory holds the
    whole size."""
    payload = zstd_zeros(chunk)
    recs = [Record(T.HEADER, header()), Record(T.CONFIG, config(0, chunks * chunk, "bomb.xml"))]
    recs += [Record(T.CONFIG_DATA, config_data(0, i * chunk, payload, length=chunk,
                                               compression=Compression.ZSTD))
             for i in range(chunks)]
    return seal(recs)


def data_bomb(records: int = 4, *, length: int = MAX_DATA_LENGTH) -> bytes:
    """A FULL archive of one device of ``records`` x ``length`` bytes stored as DATA
    records whose zstd frames of zeros expand ``length`` bytes each (32 MiB, the most a
    record may hold) out of a few KiB. ``verify`` accepts it: each record decompresses
    to exactly its length, one at a time."""
    payload = zstd_zeros(length)
    return _archive([("vda", records * length)], (
        Record(T.DATA, data(0, i * length, payload, length=length,
                            compression=Compression.ZSTD)) for i in range(records)))


def zero_filled_data(count: int = 64, *, length: int = 65536, compressed: bool = False) -> bytes:
    """A FULL archive whose device is all zeros, stored as ``count`` DATA records of
    ``length`` zero bytes (stored, or zstd with ``compressed``) instead of ZERO records:
    what a writer that does not detect zeros makes. ``verify`` accepts it; a restore must
    write (or may punch) those zeros, so the target is allocated, not sparse."""
    payload = zstd_zeros(length) if compressed else bytes(length)
    comp = Compression.ZSTD if compressed else Compression.NONE
    return _archive([("vda", count * length)], (
        Record(T.DATA, data(0, i * length, payload, length=length, compression=comp))
        for i in range(count)))


def device_content(i: int, size: int) -> bytes:
    """What :func:`many_devices` stores for device ``i``: its index, then a fill byte."""
    return (i.to_bytes(4, "little") + bytes([i % 251 + 1]) * size)[:size]


def many_devices(count: int = 40_000, *, size: int = 4096, rounds: int = 1,
                 empty: int = 0) -> bytes:
    """A FULL archive of ``count`` devices of ``size`` bytes each (``dN``, content
    :func:`device_content`), each stored in ``rounds`` DATA records whose order interleaves
    the devices (round 0 of every device, then round 1, ...), and ``empty`` more devices of
    0 bytes (``eN``), which have no record at all. ``verify`` accepts it: about 100 bytes
    of archive per device, and a restore that opens a target per device (a file, or a
    qemu-nbd) opens ``count + empty`` of them."""
    step = -(-size // rounds)
    devs = [(f"d{i}", size) for i in range(count)] + [(f"e{i}", 0) for i in range(empty)]
    content = [device_content(i, size) for i in range(count)]
    recs = (Record(T.DATA, data(i, off, content[i][off : off + step]))
            for off in range(0, size, step) for i in range(count))
    return _archive(devs, recs)


#: Strings a terminal, a log or a JSON consumer may choke on.
FORGED = {
    "escape": "\x1b[2J\x1b[31mOK\x1b]0;pwned\x07",
    "newlines": "1.0\nbackup-agent: archive OK\r\n",
    "nul": "a\x00b",
    "bidi": "\u202eKO evitca\u202c",
    "long": "x" * 0xFFFF,
}


def forged_strings(value: str | bytes = FORGED["escape"], *, field: str = "tool_version") -> bytes:
    """A FULL archive whose HEADER ``field`` (``tool_version``, ``checkpoint``, a header
    ``prop_value`` or ``prop_key``, or a device's ``device_prop``) holds ``value``: terminal
    escapes, newlines that forge an "archive OK" line, NUL, bidi overrides, 64 KiB (see
    :data:`FORGED`), or raw bytes that are not UTF-8. ``verify`` accepts any UTF-8 string
    there (the format limits only names); ``info`` prints these fields, so it must not
    pass them to a terminal as they are. Bytes that are not UTF-8 are refused ("not
    UTF-8")."""
    head: dict[str, object] = {}
    dev_props: dict[bytes | str, bytes | str] = {}
    if field in ("tool_version", "checkpoint"):
        head[field] = value
    elif field == "prop_value":
        head["props"] = {"vm": value}
    elif field == "prop_key":
        head["props"] = {value: "1"}
    elif field == "device_prop":
        dev_props = {"serial": value}
    else:
        raise ValueError(f"no such field {field!r}")
    recs = [Record(T.HEADER, header(**head)),  # type: ignore[arg-type]
            Record(T.DEVICE, device(0, 512, "vda", dev_props)),
            Record(T.ZERO, zero(0, 0, 512))]
    return seal(recs)
