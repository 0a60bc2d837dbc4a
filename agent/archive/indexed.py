"""Random access to an archive file through its trailing index.

A reader that can seek finds the 48-byte footer at the end of the file (after
any zero padding a tape left), reads the END record and the INDEX records it
points to, and from then on finds any device byte without scanning the data.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import BinaryIO

from agent.archive import codec
from agent.archive.format import (
    CHUNK_FIXED,
    DIGEST_SIZE,
    FOOTER,
    FRAME,
    NO_INDEX,
    Chunk,
    Config,
    Device,
    End,
    Footer,
    Header,
    IndexEntry,
    Kind,
    RecordType,
    Zero,
    decode_index,
    digest,
    unpack_frame,
)
from agent.archive.reader import ArchiveReader
from agent.errors import ArchiveError

_TAIL_PROBE = 1 << 20


@dataclass(frozen=True)
class _Record:
    rtype: int
    body: bytes


def _find_footer(f: BinaryIO, size: int) -> tuple[Footer, int]:
    """The footer and its position, skipping zero padding after it."""
    if size < FOOTER.size:
        raise ArchiveError("the archive is too short to hold a footer")
    f.seek(size - FOOTER.size)
    last = f.read(FOOTER.size)
    try:
        return Footer.decode(last, size - FOOTER.size), size - FOOTER.size
    except ArchiveError:
        if last.strip(b"\0"):
            raise
    # Zero padding: find the last non-zero byte, then the footer ends a little after
    # it (its digest may itself end in zero bytes).
    end = size
    while end > 0:
        start = max(0, end - _TAIL_PROBE)
        f.seek(start)
        chunk = f.read(end - start).rstrip(b"\0")
        if chunk:
            last_nonzero = start + len(chunk)
            break
        end = start
    else:
        raise ArchiveError("the archive holds nothing but zeros")
    for footer_end in range(last_nonzero, min(last_nonzero + DIGEST_SIZE, size) + 1):
        pos = footer_end - FOOTER.size
        if pos < 0:
            continue
        f.seek(pos)
        with_zeros = f.read(FOOTER.size)
        try:
            footer = Footer.decode(with_zeros, pos)
        except ArchiveError:
            continue
        if footer.archive_len == footer_end:
            return footer, pos
    raise ArchiveError("no footer found at the end of the archive: it is incomplete")


class IndexedArchive:
    """An archive file opened for random access."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed in close())
        try:
            self._open()
        except BaseException:
            self._f.close()
            raise

    def _open(self) -> None:
        f = self._f
        size = os.fstat(f.fileno()).st_size
        footer, _ = _find_footer(f, size)
        self.archive_len = footer.archive_len
        f.seek(0)
        head = ArchiveReader(f, keep_configs=False)
        self.header: Header = head.header
        self.devices: list[Device] = head.devices
        self.configs: list[Config] = head.configs
        try:
            self._read_end(footer)
        except ArchiveError as e:
            raise self._mismatch(str(e)) from e
        self._check_end_matches_start(head.data_start)

    def _read_end(self, footer: Footer) -> None:
        end_rec = self._record_at(footer.end_pos)
        if end_rec.rtype != RecordType.END:
            raise ArchiveError(f"the footer points at byte {footer.end_pos}, not an end record")
        self.end: End = End.decode(end_rec.body)
        self._entries: dict[int, list[IndexEntry]] = {d.id: [] for d in self.devices}
        if footer.index_pos != NO_INDEX:
            pos = footer.index_pos
            while pos < footer.end_pos:
                rec = self._record_at(pos)
                if rec.rtype != RecordType.INDEX:
                    break
                for e in decode_index(rec.body):
                    if e.device not in self._entries:
                        raise ArchiveError(f"index names unknown device {e.device}")
                    self._entries[e.device].append(e)
                pos += FRAME.size + len(rec.body) + DIGEST_SIZE
        for entries in self._entries.values():
            entries.sort(key=lambda e: e.offset)
        self._starts = {d: [e.offset for e in es] for d, es in self._entries.items()}

    def _check_end_matches_start(self, data_start: int | None) -> None:
        """The start (header, devices) and the end (seal, index) were found at the two ends
        of the file: make sure they are one archive. A file that held an older, longer
        archive and was overwritten without truncation (a reused tape image) has the new
        archive's start and, after the padding, the old one's end. Only a full read
        (``verify``) proves the whole; these checks catch such a mix cheaply."""
        end, devices = self.end, self.devices
        problems = []
        if (end.devices, end.configs) != (len(devices), len(self.configs)):
            problems.append("its seal counts other devices or configs")
        if self.header.kind == Kind.FULL and end.data_bytes + end.zero_bytes != sum(
                d.size for d in devices):
            problems.append("its seal covers another size than its devices")
        sizes = {d.id: d.size for d in devices}
        if any(e.offset + e.length > sizes[d] for d, es in self._entries.items() for e in es):
            problems.append("its index has ranges outside its devices")
        first = min((e for es in self._entries.values() for e in es), key=lambda e: e.pos,
                    default=None)
        if not problems and first is not None:
            if first.pos != data_start:
                problems.append("its index does not start where its data does")
            else:
                rec = self._record_at(first.pos)
                if rec.rtype == RecordType.DATA:
                    ch = Chunk.decode(rec.body, f"data record at byte {first.pos}")
                    found = (rec.rtype, ch.target, ch.offset, ch.length)
                elif rec.rtype == RecordType.ZERO:
                    z = Zero.decode(rec.body)
                    found = (rec.rtype, z.device, z.offset, z.length)
                else:
                    found = (rec.rtype, -1, -1, -1)
                if found != (first.rtype, first.device, first.offset, first.length):
                    problems.append("its first data record is not the one its index names")
        if problems:
            raise self._mismatch("; ".join(problems))

    def _mismatch(self, why: str) -> ArchiveError:
        return ArchiveError(
            f"{self.path}: the end of this file does not belong to the archive at its start, "
            f"or is damaged ({why}): is an older archive left behind it? `backup-agent "
            "verify` reads it from the start")

    def _record_at(self, pos: int) -> _Record:
        f = self._f
        f.seek(pos)
        head = f.read(FRAME.size)
        if len(head) != FRAME.size:
            raise ArchiveError(f"the archive is truncated at byte {pos}")
        fr = unpack_frame(head, pos)
        body = f.read(fr.body_len)
        dig = f.read(DIGEST_SIZE)
        if len(body) != fr.body_len or len(dig) != DIGEST_SIZE:
            raise ArchiveError(f"the archive is truncated inside the record at byte {pos}")
        if digest(body) != dig:
            raise ArchiveError(f"record at byte {pos} fails its checksum")
        return _Record(fr.rtype, body)

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise ArchiveError(f"no device named {name!r} in the archive")

    def read(self, name: str, offset: int, length: int) -> bytes:
        """Device bytes [offset, offset+length), from the records that hold them."""
        dev = self.device(name)
        if offset < 0 or length < 0 or offset + length > dev.size:
            raise ArchiveError(f"device {name!r}: range {offset}+{length} is outside the device")
        entries, starts = self._entries[dev.id], self._starts[dev.id]
        out = bytearray(length)  # ranges no record covers read as zeros (incrementals)
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        while i < len(entries) and entries[i].offset < offset + length:
            e = entries[i]
            i += 1
            lo, hi = max(offset, e.offset), min(offset + length, e.offset + e.length)
            if lo >= hi or e.rtype == RecordType.ZERO:
                continue
            rec = self._record_at(e.pos)
            ch = Chunk.decode(rec.body, f"data record at byte {e.pos}")
            if rec.rtype != RecordType.DATA or (ch.target, ch.offset, ch.length) != (
                e.device, e.offset, e.length
            ):
                raise ArchiveError(f"the index entry for byte {e.pos} does not match the "
                                   "record there: the index is damaged")
            data = codec.decompress(ch.compression, memoryview(rec.body)[CHUNK_FIXED:],
                                    ch.length, f"data record at byte {e.pos}")
            out[lo - offset : hi - offset] = memoryview(data)[lo - e.offset : hi - e.offset]
        return bytes(out)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> IndexedArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
