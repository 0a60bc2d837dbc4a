"""The properties every reader of an archive keeps, on any input at all.

:func:`check` reads one input the way each command does and raises :class:`Violation` when
a property is broken:

* the sequential reader (``restore``, ``verify``, ``info`` on a pipe; agent/archive/reader.py)
  either reads the archive or raises ArchiveError: never another exception. What it reads
  is consistent by an independent check: no two records of a device overlap, each lies
  inside its device, a full backup covers every byte, every DATA record decompresses to
  exactly its length, every config is complete, and the records it handed out are exactly
  the DATA and ZERO records framed in the bytes, in order; what follows the footer is zero;
* reading with ``verify_data=False`` and checking each record afterwards (what a consumer
  with worker threads does), and the restore engine itself (to a null target, as ``verify``),
  accept exactly what the reader accepts, with the same content;
* ``config`` (which reads only the metadata at the start) raises only ArchiveError, and
  gives the configs the full read gives when that succeeds;
* the random-access reader (``info`` on a file; agent/archive/indexed.py) raises only
  ArchiveError; on an archive the full read accepts it opens, agrees on header, devices,
  configs and seal, and reads the device bytes the full read gives (the full read accepts
  an index only if it lists exactly the DATA and ZERO records, each at its position);
* the chain check (agent/chain.py) over the input and fixed seed archives raises only
  InvalidArgument, and what it lets through is a chain by the rules of docs/FORMAT.md.

Bounds on time and memory per case are the runner's (tests/fuzz/reader.py).
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import os
import struct
import tempfile
import traceback
from dataclasses import dataclass, field

from agent.archive import codec
from agent.archive.format import (
    CHUNK_FIXED,
    FOOTER,
    FRAME,
    INDEX_ENTRY,
    PREAMBLE,
    Compression,
    Config,
    Device,
    End,
    Header,
    Kind,
    RecordType,
)
from agent.archive.indexed import IndexedArchive
from agent.archive.reader import KEPT_CONFIG_BYTES, ArchiveReader, DataRecord
from agent.archive_info import ArchiveInfo
from agent.chain import Link, check_chain
from agent.errors import ArchiveError, InvalidArgument
from agent.restore import RestoreOptions, restore, restore_chain, to_null
from tests.fuzz.mutate import parse

T = RecordType
#: Bytes of device data the random-access reader is asked for per case, at most.
READ_BUDGET = 1 << 20


class Violation(AssertionError):
    """A reader broke a property on this input."""


class KnownIssue(Exception):
    """A property is broken in a way already reported (tests/unit/test_fuzz_regressions.py
    holds its reproducer): counted, not saved again, so that a long run finds new things."""


#: IndexedArchive.read() believes the index: where it is missing (an archive without INDEX
#: records, which is valid) or lies about a ZERO range, it returns zeros for stored data.
#: Set False once indexed.py checks (tests/unit/test_fuzz_regressions.py).
KNOWN_LYING_INDEX = False
#: IndexedArchive (``info`` on a file) refuses a valid archive followed by 1 to 47 bytes
#: of tape padding: it takes the last 48 bytes for the footer unless they are all zero.
KNOWN_SHORT_PADDING = False
#: IndexedArchive raises ValueError (not ArchiveError) where the footer or an index entry
#: names a byte position of 2^63 or more (``f.seek`` cannot go there), and OSError (EINVAL
#: from the read) just below it.
KNOWN_HUGE_POSITION = False


@dataclass
class Content:
    """What a full sequential read hands out."""

    header: Header
    devices: list[Device]
    configs: dict[str, bytes]
    records: list[tuple[int, int, int, int, bytes | None]]  # type, device id, offset, length, data
    end: End
    archive_len: int
    config_list: list[Config] = field(default_factory=list)

    def key(self) -> tuple[object, ...]:
        return (self.header, self.devices, self.configs, self.records, self.end,
                self.archive_len)


def _unexpected(what: str, e: BaseException) -> Violation:
    tb = "".join(traceback.format_exception(e))
    return Violation(f"{what} raised {type(e).__name__}, not ArchiveError: {e}\n{tb}")


def read_sequential(data: bytes, *, verify_data: bool, release: bool) -> Content:
    """Read like restore does: every record, decompressed; raises ArchiveError."""
    configs: dict[str, bytearray] = {}

    def config_piece(cfg: Config, piece: bytes | bytearray | memoryview) -> None:
        configs.setdefault(cfg.name, bytearray()).extend(piece)

    # Every config, whatever its size (config() holds only KEPT_CONFIG_BYTES of them).
    r = ArchiveReader(io.BytesIO(data), verify_data=verify_data, keep_configs=False,
                      on_config_data=config_piece)
    recs: list[tuple[int, int, int, int, bytes | None]] = []
    for rec in r.records():
        if isinstance(rec, DataRecord):
            if not verify_data:
                rec.check()
            got = bytes(rec.data())
            if release:
                rec.release()
            recs.append((T.DATA, rec.device.id, rec.offset, rec.length, got))
        else:
            recs.append((T.ZERO, rec.device.id, rec.offset, rec.length, None))
    if r.end is None:
        raise Violation("records() returned without an END record")
    return Content(r.header, list(r.devices),
                   {c.name: bytes(configs.get(c.name, b"")) for c in r.configs},
                   recs, r.end, r.archive_len, list(r.configs))


def _attempt(what: str, fn: object) -> object:
    """``fn()``, or the ArchiveError it raised; any other exception is a violation."""
    try:
        return fn()  # type: ignore[operator]
    except ArchiveError as e:
        if not str(e):
            raise Violation(f"{what}: an ArchiveError without a message") from e
        return e
    except Violation:
        raise
    except Exception as e:
        raise _unexpected(what, e) from e


def check(data: bytes, *, engine: bool = True) -> str:
    """Check every property on ``data``; return a short label of the outcome (for stats).

    ``engine``: also run the restore engine (threads: slower; the runner does it for a
    share of the cases)."""
    full = _attempt("the sequential reader", lambda: read_sequential(
        data, verify_data=True, release=False))
    other = _attempt("the sequential reader (verify_data=False)", lambda: read_sequential(
        data, verify_data=False, release=True))
    if isinstance(full, Content) != isinstance(other, Content):
        raise Violation(f"verify_data=True gave {_label(full)}, verify_data=False with "
                        f"check() gave {_label(other)}")
    if isinstance(full, Content):
        assert isinstance(other, Content)
        if full.key() != other.key():
            raise Violation("verify_data=False read other content than verify_data=True")
        _consistent(data, full)
    if engine:
        _check_engine(data, full)
    _check_info_pipe(data, full)
    _check_config(data, full)
    _check_chains(data, full, engine)
    try:
        _check_codec(data)
        _check_indexed(data, full)
    except KnownIssue as e:
        return f"{_label(full)}; known issue: {e}"
    return _label(full)


def _label(outcome: object) -> str:
    if isinstance(outcome, Content):
        return "read"
    assert isinstance(outcome, ArchiveError)
    return f"refused: {type(outcome).__name__}"


# --- the full read, checked independently -------------------------------------------------


def _consistent(data: bytes, c: Content) -> None:
    """What an accepted archive holds, checked without the reader's own bookkeeping."""
    sizes = {d.id: d.size for d in c.devices}
    if [d.id for d in c.devices] != list(range(len(c.devices))):
        raise Violation("device ids are not 0, 1, 2, ...")
    if len({d.name for d in c.devices}) != len(c.devices):
        raise Violation("two devices share a name")
    ranges: dict[int, list[tuple[int, int]]] = {d: [] for d in sizes}
    totals = [0, 0]
    for rtype, dev, off, length, got in c.records:
        if dev not in sizes or length < 1 or off + length > sizes[dev]:
            raise Violation(f"record {off}+{length} of device {dev} is outside it")
        if got is not None and len(got) != length:
            raise Violation(f"a data record gave {len(got)} bytes for a length of {length}")
        ranges[dev].append((off, off + length))
        totals[rtype == T.ZERO] += length
    for dev, rs in ranges.items():
        rs.sort()
        for (_, e1), (s2, _) in itertools.pairwise(rs):
            if s2 < e1:
                raise Violation(f"device {dev}: records overlap at {s2}")
        if c.header.kind == Kind.FULL and sum(e - s for s, e in rs) != sizes[dev]:
            raise Violation(f"device {dev}: a full backup that does not cover the device")
    if (c.end.data_bytes, c.end.zero_bytes) != tuple(totals):
        raise Violation("the seal's totals differ from the records read")
    for cfg in c.config_list:
        if len(c.configs[cfg.name]) != cfg.size:
            raise Violation(f"config {cfg.name!r} read with another size than declared")
    framed = _framed(data)
    if framed[0] != [(t, d, o, ln) for t, d, o, ln, _ in c.records]:
        raise Violation("the records read are not the DATA and ZERO records in the bytes")
    if c.end.records and _has_index(data) and not honest_index(data):
        raise Violation("the full read accepted an index that does not list its records")
    if data[c.archive_len :].strip(b"\0") or framed[1] + FOOTER.size != c.archive_len:
        raise Violation("bytes after the footer that are not zero, or a misplaced footer")


def _framed(data: bytes) -> tuple[list[tuple[int, int, int, int]], int]:
    """The DATA and ZERO records as framed in ``data`` and the position after END."""
    parts = parse(data)
    assert parts is not None
    out = []
    pos = PREAMBLE.size
    for r in parts.records:
        if r.rtype == T.DATA:
            dev, _c, _a, _b, off, ln, _r = struct.unpack_from("<IBBHQII", r.body)
            out.append((int(T.DATA), dev, off, ln))
        elif r.rtype == T.ZERO:
            dev, _r, off, ln = struct.unpack_from("<IIQQ", r.body)
            out.append((int(T.ZERO), dev, off, ln))
        pos = r.pos + FRAME.size + len(r.body) + 16
    return out, pos


def _has_index(data: bytes) -> bool:
    parts = parse(data)
    return parts is not None and any(r.rtype == T.INDEX for r in parts.records)


def honest_index(data: bytes) -> bool:
    """Whether the INDEX records of a well-formed archive list exactly its DATA and ZERO
    records, at their positions, in order (the entries' reserved field aside)."""
    parts = parse(data)
    assert parts is not None
    want = bytearray()
    have = bytearray()
    for r in parts.records:
        if r.rtype == T.DATA:
            dev, comp, _a, _b, off, ln, _r = struct.unpack_from("<IBBHQII", r.body)
            want += INDEX_ENTRY.pack(T.DATA & 0xFF, comp, 0, dev, off, ln, r.pos)
        elif r.rtype == T.ZERO:
            dev, _r, off, ln = struct.unpack_from("<IIQQ", r.body)
            want += INDEX_ENTRY.pack(T.ZERO & 0xFF, 0, 0, dev, off, ln, r.pos)
        elif r.rtype == T.INDEX:
            body = bytearray(r.body)
            n = len(body) // INDEX_ENTRY.size
            body[2 :: INDEX_ENTRY.size] = bytes(n)  # reserved: readers ignore it
            body[3 :: INDEX_ENTRY.size] = bytes(n)
            have += body
    return want == have


# --- the other consumers ------------------------------------------------------------------


def _check_codec(data: bytes) -> None:
    """Both ways of decompressing a payload (into a new buffer: config data and random
    access; into a reused one: restore's DATA records) agree on every payload in ``data``."""
    parts = parse(data)
    for r in parts.records if parts else []:
        if r.rtype not in (T.DATA, T.CONFIG_DATA) or len(r.body) < CHUNK_FIXED:
            continue
        comp, length = r.body[4], struct.unpack_from("<I", r.body, 16)[0]
        if comp != Compression.ZSTD or not 0 < length <= 1 << 20:
            continue
        got = [_attempt("codec.decompress", functools.partial(_decompress, r.body, length, out))
               for out in (None, bytearray(length))]
        if isinstance(got[0], bytes) != isinstance(got[1], bytes) or (
                isinstance(got[0], bytes) and got[0] != got[1]):
            raise Violation(f"codec.decompress gives {_label_codec(got[0])} into a new buffer "
                            f"and {_label_codec(got[1])} into a given one")


def _decompress(body: bytes, length: int, out: bytearray | None) -> bytes:
    return bytes(codec.decompress(Compression.ZSTD, body[CHUNK_FIXED:], length, "payload", out))


def _label_codec(got: object) -> str:
    return f"{len(got)} bytes" if isinstance(got, bytes) else f"an error ({got})"


def _check_engine(data: bytes, full: object) -> None:
    """The restore engine (verify's path) accepts what the reader accepts."""
    opts = RestoreOptions(memory=1 << 20, workers=2)
    try:
        restore(io.BytesIO(data), to_null(), opts)
        ok: object = True
    except ArchiveError as e:
        ok = e
    except Exception as e:
        raise _unexpected("the restore engine", e) from e
    if (ok is True) != isinstance(full, Content):
        raise Violation(f"the restore engine gave {ok!r}, the reader {_label(full)}")


def _check_info_pipe(data: bytes, full: object) -> None:
    """``info`` on a pipe: the records read but not checked or decompressed. It may accept
    an archive whose data a full read refuses, never refuse one it accepts, and must agree
    with it on what it shows."""

    def info() -> tuple[object, ...]:
        r = ArchiveReader(io.BytesIO(data), verify_data=False, keep_configs=False)
        for _ in r.records():
            pass
        return (r.header, list(r.devices), list(r.configs), r.end, r.archive_len)

    got = _attempt("info on a pipe", info)
    if isinstance(full, Content) and got != (full.header, full.devices, full.config_list,
                                             full.end, full.archive_len):
        what = _label(got) if isinstance(got, ArchiveError) else "other contents"
        raise Violation(f"info on a pipe gave {what} on an archive the full read accepts")


def _check_config(data: bytes, full: object) -> None:
    def head() -> dict[str, bytes | ArchiveError]:
        r = ArchiveReader(io.BytesIO(data), verify_data=False)
        out: dict[str, bytes | ArchiveError] = {}
        for name in [c.name for c in r.configs] + ["no-such-config"]:
            try:
                out[name] = r.config(name)
            except ArchiveError as e:
                out[name] = e
        return out

    got = _attempt("config", head)
    if isinstance(full, Content):
        if not isinstance(got, dict):
            raise Violation(f"config refused an archive the full read accepts: {got}")
        mine = {k: v for k, v in got.items() if not isinstance(v, ArchiveError)}
        # config() may refuse a config only for its size: past KEPT_CONFIG_BYTES in all.
        kept = 0
        for cfg in full.config_list:
            fits = kept + cfg.size <= KEPT_CONFIG_BYTES
            kept += cfg.size if fits else 0
            if fits != (cfg.name in mine):
                raise Violation(f"config gave {cfg.name!r} ({cfg.size} bytes, {kept} kept): "
                                f"{_label(got[cfg.name])}")
        if mine != {k: v for k, v in full.configs.items() if k in mine}:
            raise Violation("config gave other configs than the full read")


_TMP: list[str] = []


def _scratch_path() -> str:
    """One file per process for the random-access reader (on tmpfs where there is one)."""
    if not _TMP:
        where = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        fd, path = tempfile.mkstemp(prefix="ba-fuzz-", dir=where)
        os.close(fd)
        _TMP.append(path)
    return _TMP[0]


def cleanup() -> None:
    """Remove the scratch file (the runner calls it at exit)."""
    while _TMP:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_TMP.pop())


def _check_indexed(data: bytes, full: object) -> None:
    path = _scratch_path()
    with open(path, "wb") as f:
        f.write(data)
    honest = isinstance(full, Content) and honest_index(data)

    def run() -> tuple[tuple[object, ...], list[tuple[str, int, bytes]]]:
        with IndexedArchive(path) as arc:
            seen = (arc.header, list(arc.devices), list(arc.configs), arc.end, arc.archive_len)
            # what `info --json` prints of it
            json.dumps(ArchiveInfo(arc.header, arc.devices, arc.configs, arc.end,
                                   arc.archive_len).as_dict())
            reads = []
            budget = READ_BUDGET
            for dev, off, ln in _windows(arc.devices, full):
                ln = min(ln, budget)
                budget -= ln
                reads.append((dev.name, off, arc.read(dev.name, off, ln)))
            return seen, reads

    try:
        got = _attempt("the random-access reader", run)
    except Violation as e:
        cause = e.__cause__
        if KNOWN_HUGE_POSITION and isinstance(cause, (ValueError, OverflowError, OSError)) and any(
                "_record_at" in line for line in traceback.format_tb(cause.__traceback__)):
            raise KnownIssue("the random-access reader seeks to a position past 2^63") from e
        raise
    if not isinstance(full, Content):
        return
    if isinstance(got, ArchiveError):
        if honest:
            if 0 < len(data) - full.archive_len < FOOTER.size and KNOWN_SHORT_PADDING:
                raise KnownIssue("the random-access reader refuses padding under 48 bytes")
            parts = parse(data)
            if parts and not any(r.rtype == T.INDEX for r in parts.records) and (
                    "has no index" in str(got)):
                return  # without an index it cannot find stored bytes: refusing is right
            raise Violation(f"the random-access reader refused a valid archive: {got}")
        return
    assert isinstance(got, tuple)
    seen, reads = got
    if seen != (full.header, full.devices, full.config_list, full.end, full.archive_len):
        raise Violation("the random-access reader disagrees with the full read on the "
                        "header, devices, configs or seal")
    for name, off, chunk in reads:
        if _expected(full, name, off, len(chunk)) != chunk:
            if not honest and KNOWN_LYING_INDEX:
                raise KnownIssue("random-access reads trust a missing or lying index")
            raise Violation(f"the random-access reader read other bytes of {name!r} at "
                            f"{off} than the full read")


def _windows(devices: list[Device], full: object) -> list[tuple[Device, int, int]]:
    """Device ranges to read: each record's range and its edges, or the devices' starts."""
    out = []
    by_id = {d.id: d for d in devices}
    if isinstance(full, Content):
        for _t, dev, off, ln, _d in full.records:
            if dev in by_id:
                out.append((by_id[dev], off, ln))
                if off:
                    out.append((by_id[dev], off - 1, 2))
    for d in devices:
        out.append((d, 0, min(d.size, 1 << 16)))
    return out


def _expected(c: Content, name: str, off: int, length: int) -> bytes:
    """Device bytes [off, off+length) as the full read gives them (holes and ZERO ranges
    read as zeros); devices may be far larger than memory, so only the window is built."""
    dev = next(d.id for d in c.devices if d.name == name)
    out = bytearray(length)
    for _t, d, roff, _ln, got in c.records:
        if d != dev or got is None:
            continue
        lo, hi = max(off, roff), min(off + length, roff + len(got))
        if lo < hi:
            out[lo - off : hi - off] = got[lo - roff : hi - roff]
    return bytes(out)


# --- chains ------------------------------------------------------------------------------


def _check_chains(data: bytes, outcome: object, engine: bool) -> None:
    from tests.fuzz.seeds import FULL, INCREMENTAL

    def head(raw: bytes) -> Link:
        r = ArchiveReader(io.BytesIO(raw), verify_data=False, keep_configs=False)
        return Link("x", r.header, list(r.devices))

    link = _attempt("the reader of the header", lambda: head(data))
    if not isinstance(link, Link):
        return
    full, inc = _seed_links(FULL, INCREMENTAL, head)
    linked = False
    for chain in ([link], [full, link], [link, inc], [full, link, inc]):
        for wanted in (None, ["vda"], ["nothing"]):
            try:
                check_chain(chain, wanted)
            except InvalidArgument:
                continue
            except Exception as e:
                raise _unexpected("the chain check", e) from e
            _is_chain(chain, wanted)
            linked = linked or (chain == [full, link] and wanted is None)
    if engine:
        _check_chain_restore(data, FULL, isinstance(outcome, Content) and linked)


def _check_chain_restore(data: bytes, full: bytes, expect_ok: bool) -> None:
    """``restore FULL X`` to a null target succeeds exactly when X is a valid archive that
    builds on FULL."""
    streams = [(io.BytesIO(full), "full"), (io.BytesIO(data), "x")]
    try:
        restore_chain(streams, to_null(), RestoreOptions(memory=1 << 20, workers=2))
        ok = True
    except (ArchiveError, InvalidArgument) as e:
        if expect_ok:
            raise Violation(f"restore of a valid chain failed: {e}") from e
        return
    except Exception as e:
        raise _unexpected("restore of a chain", e) from e
    if ok and not expect_ok:
        raise Violation("restore of a chain succeeded where the reader or check_chain refuses")


_SEED_LINKS: list[Link] = []


def _seed_links(full: bytes, inc: bytes, head: object) -> tuple[Link, Link]:
    if not _SEED_LINKS:
        _SEED_LINKS.extend([head(full), head(inc)])  # type: ignore[operator]
    return _SEED_LINKS[0], _SEED_LINKS[1]


def _is_chain(chain: list[Link], wanted: list[str] | None) -> None:
    """The rules check_chain enforces, restated (docs/FORMAT.md, property 5)."""
    first = chain[0]
    if first.header.kind != Kind.FULL or any(c.header.kind == Kind.FULL for c in chain[1:]):
        raise Violation("the chain check let through a chain that is not full, then changes")
    if len({c.header.uuid for c in chain}) != len(chain):
        raise Violation("the chain check let through an archive given twice")
    for prev, cur in itertools.pairwise(chain):
        if cur.header.parent_uuid != prev.header.uuid:
            raise Violation("the chain check let through a broken parent link")
    sizes = {d.name: d.size for d in first.devices}
    names = set(wanted) if wanted is not None else set(sizes)
    for link in chain[1:]:
        theirs = {d.name: d.size for d in link.devices}
        for n in names:
            if n not in theirs or (n in sizes and sizes[n] != theirs[n]):
                raise Violation(f"the chain check let through device {n!r} missing or resized")
