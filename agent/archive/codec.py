"""Payload compression for DATA and CONFIG_DATA records.

Each record is compressed on its own (a damaged record never spoils its
neighbours, and records can be compressed by a pool of threads: zstandard
releases the GIL). A payload that does not shrink is stored as it is.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import zstandard

from agent.archive.format import MAX_DATA_LENGTH, Compression
from agent.errors import ArchiveError

_local = threading.local()


@dataclass(frozen=True)
class CompressionSpec:
    """What the user chose: zstd at a level, or none."""

    method: Compression = Compression.ZSTD
    level: int = 1  # fast: a backup is bound by time more than space (vzdump uses 1 too)

    @classmethod
    def parse(cls, text: str) -> CompressionSpec:
        """Parse ``none``, ``zstd`` or ``zstd:LEVEL``; raises ValueError with a reason."""
        if text == "none":
            return cls(Compression.NONE, 0)
        name, _, level = text.partition(":")
        if name != "zstd":
            raise ValueError(f"unknown compression {text!r} (use zstd, zstd:LEVEL or none)")
        if not level:
            return cls()
        try:
            lvl = int(level)
        except ValueError:
            raise ValueError(f"zstd level {level!r} is not a number") from None
        if not -7 <= lvl <= 22:
            raise ValueError(f"zstd level {lvl} is out of range (-7..22)")
        return cls(Compression.ZSTD, lvl)

    def __str__(self) -> str:
        return "none" if self.method == Compression.NONE else f"zstd:{self.level}"


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not thread-safe: one per thread and level.
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def compress(
    data: bytes | bytearray | memoryview, spec: CompressionSpec
) -> tuple[Compression, bytes | bytearray | memoryview]:
    """Compress one payload; fall back to storing it when that is not smaller."""
    if spec.method == Compression.NONE:
        return Compression.NONE, data
    packed: bytes = _compressor(spec.level).compress(data)
    if len(packed) >= len(data):
        return Compression.NONE, data
    return Compression.ZSTD, packed


#: zstd's frame magic number, as its first 4 bytes.
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: Blocks a frame may have, per byte it holds: zstd's own compressor makes blocks of 128 KiB
#: (1 KiB at the least, with the smallest window; ~670 bytes with its block splitter).
#: Walking a block costs ~0.3 us in Python: without a bound, 32 MiB of empty 3-byte blocks
#: took 3.6 s per record.
_BYTES_PER_BLOCK = 256
_BLOCKS_EXTRA = 16


def _frame_end(payload: memoryview, length: int, where: str) -> int:
    """The byte just after the zstd frame that starts ``payload``, from its block headers
    (zstd's frame format, RFC 8878): zstd itself decodes a frame and stops, silent about
    what follows it, and a frame cut short after its content decodes in a stream."""
    if payload[:4] != _ZSTD_MAGIC:
        raise ArchiveError(f"{where}: cannot decompress: the payload is not a zstd frame")
    pos = zstandard.frame_header_size(payload)
    checksum = 4 if payload[4] & 0x04 else 0
    n = len(payload)
    for _ in range(length // _BYTES_PER_BLOCK + _BLOCKS_EXTRA):
        if pos + 3 > n:
            raise ArchiveError(f"{where}: cannot decompress: the zstd frame is cut short")
        head = int.from_bytes(payload[pos : pos + 3], "little")
        pos += 3 + (1 if (head >> 1) & 3 == 1 else head >> 3)  # an RLE block holds 1 byte
        if head & 1:  # the last block
            return pos + checksum
    raise ArchiveError(f"{where}: cannot decompress: the zstd frame has more blocks "
                       f"than {length} bytes need")


def decompress(
    method: Compression, payload: bytes | bytearray | memoryview, length: int, where: str,
    out: bytearray | None = None,
) -> bytes | bytearray | memoryview:
    """Undo :func:`compress`, checking the payload is exactly one zstd frame of exactly
    ``length`` bytes, nothing before or after it.

    With ``out`` (at least ``length`` bytes), a compressed payload is decompressed into
    it and a view of it returned, instead of into a new allocation. Both ways run the same
    code: what one accepts, the other does."""
    if method == Compression.NONE:
        if len(payload) != length:
            raise ArchiveError(f"{where}: stored {len(payload)} bytes, expected {length}")
        return payload
    if length > MAX_DATA_LENGTH:
        raise ArchiveError(f"{where}: length {length} is over the limit")
    view = memoryview(payload)
    try:
        # zstd trusts the frame's own content size: check it first, so that a hostile
        # frame never makes us allocate what it claims.
        claimed = zstandard.frame_content_size(view)
        if claimed != length:
            raise ArchiveError(
                f"{where}: compressed frame claims {claimed} bytes, expected {length}"
            )
        end = _frame_end(view, length, where)
        if end != len(view):
            what = "is cut short" if end > len(view) else f"is followed by {len(view) - end} bytes"
            raise ArchiveError(f"{where}: cannot decompress: the zstd frame {what}")
        buf = out if out is not None else bytearray(length)
        result = memoryview(buf)[:length]
        got = 0
        with _decompressor().stream_reader(view) as reader:
            while got < length:
                n = reader.readinto(result[got:])
                if not n:
                    break
                got += n
            # Read on to the frame's end, where zstd checks the frame's size and checksum:
            # the frame must hold exactly ``length`` bytes, not more.
            if got == length and reader.read(1):
                got += 1
    except zstandard.ZstdError as e:
        raise ArchiveError(f"{where}: cannot decompress: {e}") from e
    if got != length:
        raise ArchiveError(f"{where}: decompressed to {got} bytes, expected {length}")
    return result if out is not None else buf
