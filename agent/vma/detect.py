"""Which reader an input needs, told by its first bytes: ours, VMA, or either of them
compressed as a whole stream (``vzdump`` writes ``.vma.zst``, ``.vma.gz``, ``.vma.lzo``).

The bytes read to tell are handed back in front of the stream (:class:`Prefixed`), so a
pipe works as well as a file. zstd and gzip are undone here (the zstandard module is a
dependency already, gzip is in Python); lzo is not worth one: the error says to pipe
through ``lzop -dc``.
"""

from __future__ import annotations

import io
import os
import stat
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from agent.errors import ArchiveError
from agent.vma.format import MAGIC

if TYPE_CHECKING:
    from agent.archive.reader import ArchiveReader
    from agent.vma.reader import VmaReader

_ZSTD = b"\x28\xb5\x2f\xfd"
_GZIP = b"\x1f\x8b"
_LZO = b"\x89LZO"
_SNIFF = 4


class Prefixed(io.RawIOBase):
    """``raw`` with ``prefix`` (bytes already read from it) in front again."""

    def __init__(self, prefix: bytes, raw: Any) -> None:
        super().__init__()
        self._prefix = memoryview(prefix)
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return int(self._raw.readinto(b) or 0)

    def fileno(self) -> int:
        # Its descriptor (a pipe's) lets the reader wait for input; none for a
        # decompressor, which then simply blocks in its reads.
        return int(self._raw.fileno())

    def close(self) -> None:
        super().close()  # the caller closes the stream it opened


def _read_exactly(f: Any, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        piece = f.read(n - len(out))
        if not piece:
            break
        out += piece
    return bytes(out)


class _Decompressed(io.RawIOBase):
    """A decompressor's reader, turning its errors into one clear line."""

    def __init__(self, reader: Any, codec: str, errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self._r = reader
        self._codec = codec
        self._errors = errors

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            return int(self._r.readinto(b) or 0)
        except self._errors as e:
            raise ArchiveError(f"the {self._codec} stream around the archive is damaged or "
                               f"truncated: {e}") from e


def sniff(f: BinaryIO) -> tuple[str, BinaryIO]:
    """``("vma" | "ours", stream)``: the format and a stream that reads from its first
    byte again, decompressed if it was a compressed stream."""
    head = _read_exactly(f, _SNIFF)
    if head.startswith(_ZSTD):
        import zstandard

        # One frame after another (zstd -dc does the same); a bounded window.
        zreader = zstandard.ZstdDecompressor().stream_reader(
            cast(BinaryIO, Prefixed(head, f)), read_across_frames=True, closefd=False)
        return sniff(cast(BinaryIO, _Decompressed(zreader, "zstd", (zstandard.ZstdError,))))
    if head.startswith(_GZIP):
        import gzip
        import zlib

        gzreader = gzip.GzipFile(fileobj=cast(BinaryIO, Prefixed(head, f)), mode="rb")
        return sniff(cast(BinaryIO, _Decompressed(gzreader, "gzip",
                                                  (OSError, EOFError, zlib.error))))
    if head.startswith(_LZO):
        raise ArchiveError("the archive is lzop-compressed (.vma.lzo), which backup-agent "
                           "does not decompress: pipe it through `lzop -dc FILE |` and read "
                           "it from -")
    kind = "vma" if head == MAGIC else "ours"
    return kind, cast(BinaryIO, Prefixed(head, f))


def open_reader(f: BinaryIO, **kwargs: Any) -> ArchiveReader | VmaReader:
    """The reader for ``f``, ours or VMA, with ArchiveReader's keyword arguments."""
    kind, stream = sniff(f)
    if kind == "vma":
        from agent.vma.reader import VmaReader

        kwargs.pop("label", None)  # ours only: VMA has no encryption, so no keys either
        kwargs.pop("keys", None)
        return VmaReader(stream, **kwargs)
    from agent.archive.reader import ArchiveReader

    return ArchiveReader(stream, **kwargs)


def refuse_to_serve(paths: list[str]) -> None:
    """``serve`` reads an archive through its index: VMA has none, and a compressed
    stream cannot be read at random. Say what to do instead."""
    for path in paths:
        try:  # only regular files (a FIFO's open would wait); the rest is left to serve
            if not stat.S_ISREG(os.stat(path).st_mode):
                continue
            with open(path, "rb") as f:
                head = f.read(_SNIFF)
        except OSError:
            continue
        if head == MAGIC or head.startswith((_ZSTD, _GZIP, _LZO)):
            kind = "a VMA archive" if head == MAGIC else "a compressed stream"
            raise ArchiveError(
                f"{path} is {kind}, which has no index to serve from: restore it first "
                f"(backup-agent restore {path} --to-dir DIR) and serve the disk, or back the "
                "restored disks up again in the native format")


def plain_native(f: BinaryIO) -> bool:
    """Whether the open file ``f`` starts as our own uncompressed archive does (not VMA,
    not a compressed stream): only then can its index be used. Reads its first bytes."""
    f.seek(0)
    head = f.read(_SNIFF)
    return not (head == MAGIC or head.startswith((_ZSTD, _GZIP, _LZO)))
