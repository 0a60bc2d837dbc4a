"""The archive format: constants, record layouts, encoders and decoders.

This module mirrors docs/FORMAT.md; change both together. All integers are
little-endian. An archive is::

    Preamble(16) || Record* || Footer(48) || zero padding*

and every record is framed as::

    FrameHeader(24) || body(body_len) || digest(16)

The frame header carries a CRC-32 of itself so a damaged length is caught
before anything is read or allocated; the digest is BLAKE3 of the body,
truncated to 128 bits; the END record seals the whole sequence with a BLAKE3
over the preamble and every frame header and digest in order.

Nothing here does I/O: these are pure functions over bytes, tested directly.
"""

from __future__ import annotations

import enum
import os
import re
import struct
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from uuid import UUID

import blake3

from agent.errors import ArchiveError, UnsupportedArchive

# --- Preamble -------------------------------------------------------------------------

MAGIC = b"\x89BAGENT\n"  # like PNG: a high byte and a newline catch text-mode damage
VERSION_MAJOR = 1
VERSION_MINOR = 0
#: Encrypted archives say 1.1 (encryption method 1 and the DETAILS record came with it);
#: plain archives stay 1.0, byte for byte what they were.
VERSION_MINOR_ENCRYPTED = 1
PREAMBLE = struct.Struct("<8sHHI")  # magic, major, minor, flags (0)
assert PREAMBLE.size == 16

# --- Frames ---------------------------------------------------------------------------

FRAME_MAGIC = b"BREC"
FRAME = struct.Struct("<4sHHQII")  # magic, type, flags, seq, body_len, header_crc
assert FRAME.size == 24
DIGEST_SIZE = 16

FLAG_OPTIONAL = 0x0001  # a reader that does not know this type may skip the record
KNOWN_FLAGS = FLAG_OPTIONAL

# A DATA record holds at most this much device data, so no reader ever needs more
# than a few tens of MiB for one record, whatever a damaged length field says.
MAX_DATA_LENGTH = 32 * 1024 * 1024
MAX_BODY = MAX_DATA_LENGTH + 64 * 1024  # headroom for an incompressible payload
MAX_NAME = 255
MAX_TEXT = 0xFFFF  # other text fields: the writer accepts up to the u16 length, so must we
MAX_DEVICE_SIZE = 2**63 - 1


class RecordType(enum.IntEnum):
    HEADER = 0x0001
    DEVICE = 0x0002
    CONFIG = 0x0003
    CONFIG_DATA = 0x0004
    DETAILS = 0x0008  # encrypted archives: the header fields kept out of the clear HEADER
    DATA = 0x0010
    ZERO = 0x0011
    INDEX = 0x0020
    END = 0x00FF


class Kind(enum.IntEnum):
    FULL = 0
    INCREMENTAL = 1
    DIFFERENTIAL = 2


class Compression(enum.IntEnum):
    NONE = 0
    ZSTD = 1


class HashAlgo(enum.IntEnum):
    BLAKE3_128 = 1


class Encryption(enum.IntEnum):
    NONE = 0
    X25519_AES256GCM = 1  # docs/FORMAT.md, "Encryption"


def digest(body: bytes | bytearray | memoryview) -> bytes:
    """The record digest: BLAKE3 of the body, first 128 bits."""
    return blake3.blake3(body).digest(DIGEST_SIZE)


def header_crc(prefix: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(prefix) & 0xFFFFFFFF


def pack_frame(rtype: int, flags: int, seq: int, body_len: int) -> bytes:
    """The 24-byte frame header, its CRC included."""
    prefix = FRAME.pack(FRAME_MAGIC, rtype, flags, seq, body_len, 0)[:20]
    return prefix + struct.pack("<I", header_crc(prefix))


@dataclass(frozen=True)
class Frame:
    rtype: int
    flags: int
    seq: int
    body_len: int


def unpack_frame(raw: bytes | bytearray | memoryview, pos: int) -> Frame:
    """Decode and check a frame header read at byte ``pos`` of the archive."""
    magic, rtype, flags, seq, body_len, crc = FRAME.unpack(raw)
    if magic != FRAME_MAGIC:
        raise ArchiveError(f"no record at byte {pos}: bad record magic {bytes(magic)!r}")
    if crc != header_crc(memoryview(raw)[:20]):
        raise ArchiveError(f"record header at byte {pos} is damaged (CRC mismatch)")
    if body_len > MAX_BODY:
        raise ArchiveError(
            f"record at byte {pos} claims a body of {body_len} bytes (limit {MAX_BODY})"
        )
    return Frame(rtype, flags, seq, body_len)


def pack_preamble(minor: int = VERSION_MINOR) -> bytes:
    return PREAMBLE.pack(MAGIC, VERSION_MAJOR, minor, 0)


def check_preamble(raw: bytes) -> None:
    if len(raw) < PREAMBLE.size:
        if not raw:
            raise ArchiveError("the archive is empty")
        raise ArchiveError(f"the archive is truncated: only {len(raw)} bytes")
    magic, major, _minor, flags = PREAMBLE.unpack(raw)
    if magic != MAGIC:
        raise ArchiveError("not a backup-agent archive (bad magic at byte 0)")
    if major != VERSION_MAJOR:
        raise UnsupportedArchive(
            f"archive format version {major} is not supported "
            f"(this backup-agent reads version {VERSION_MAJOR})"
        )
    if flags != 0:
        raise UnsupportedArchive(f"archive preamble has unknown flags {flags:#x}")


# --- Small encoding helpers -----------------------------------------------------------


class _Cursor:
    """Reads fields from a record body, turning every shortfall into an ArchiveError."""

    def __init__(self, body: bytes | bytearray | memoryview, what: str) -> None:
        self.buf = memoryview(body)
        self.pos = 0
        self.what = what

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ArchiveError(f"{self.what} is too short for its fields")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        return st.unpack(self.take(st.size))

    def text(self, max_len: int) -> str:
        (n,) = self.unpack(_U16)
        if n > max_len:
            raise ArchiveError(f"{self.what} has a name of {n} bytes (limit {max_len})")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ArchiveError(f"{self.what} has a name that is not UTF-8") from e

    def props(self) -> dict[str, str]:
        (count,) = self.unpack(_U16)
        out: dict[str, str] = {}
        for _ in range(count):
            key = self.text(MAX_TEXT)
            (vlen,) = self.unpack(_U32)
            try:
                out[key] = bytes(self.take(vlen)).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ArchiveError(f"{self.what} has a property that is not UTF-8") from e
        return out

    # Trailing bytes after the known fields are allowed: later minor versions may append
    # fields, so decoders never check that a body was consumed to its end.


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def _text(s: str) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError(f"text too long: {len(raw)} bytes")
    return _U16.pack(len(raw)) + raw


def _props(props: Mapping[str, str]) -> bytes:
    out = [_U16.pack(len(props))]
    for k, v in props.items():
        raw = v.encode("utf-8")
        out += [_text(k), _U32.pack(len(raw)), raw]
    return b"".join(out)


_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")


def check_name(name: str, what: str) -> None:
    """Device and config names become file names on restore: keep them boring."""
    if not _NAME_RE.fullmatch(name):
        raise ArchiveError(
            f"{what} name {name!r} is not allowed: use 1-255 characters from "
            "A-Z a-z 0-9 _ . + -, not starting with . + or -"
        )


# --- Record bodies --------------------------------------------------------------------

def new_archive_uuid(now_ns: int | None = None) -> UUID:
    """A fresh archive uuid in the UUIDv7 layout (RFC 9562): 48 bits of Unix time in
    milliseconds, then random bits. Uuids of later backups sort after earlier ones, which
    lets the agent order the checkpoints it finds in a VM (:mod:`agent.qemu.checkpoints`)."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & (1 << 48) - 1) << 80 | rand & ~(0xF << 76 | 0x3 << 62)
    value |= 0x7 << 76 | 0x2 << 62  # version 7, RFC 4122 variant
    return UUID(int=value)


_HEADER = struct.Struct("<16s16sqBBBBI")  # uuid, parent, created_ns, kind, enc, hash, 0, 0


@dataclass(frozen=True)
class Header:
    uuid: UUID
    created_ns: int
    tool_version: str
    kind: Kind = Kind.FULL
    parent_uuid: UUID | None = None
    checkpoint: str = ""
    encryption: Encryption = Encryption.NONE
    hash_algo: HashAlgo = HashAlgo.BLAKE3_128
    props: Mapping[str, str] = field(default_factory=dict)
    encryption_params: bytes = b""  # the wrapped data keys (crypto.py); empty when NONE

    def encode(self) -> bytes:
        parent = self.parent_uuid.bytes if self.parent_uuid else bytes(16)
        fixed = _HEADER.pack(
            self.uuid.bytes, parent, self.created_ns, self.kind, self.encryption,
            self.hash_algo, 0, 0,
        )
        # encryption parameters: length-prefixed, empty while encryption is NONE
        return (fixed + _text(self.tool_version) + _text(self.checkpoint)
                + _U32.pack(len(self.encryption_params)) + self.encryption_params
                + _props(self.props))

    def clear(self) -> Header:
        """What an encrypted archive's HEADER keeps in the clear: the rest goes to DETAILS."""
        return Header(self.uuid, self.created_ns, "", self.kind, self.parent_uuid, "",
                      self.encryption, self.hash_algo, {}, self.encryption_params)

    def with_details(self, details: Details) -> Header:
        return Header(self.uuid, self.created_ns, details.tool_version, self.kind,
                      self.parent_uuid, details.checkpoint, self.encryption, self.hash_algo,
                      details.props, self.encryption_params)

    def describe(self) -> str:
        """The header on one line, for ``--debug``."""
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.created_ns // 10**9))
        parent = f" of {self.parent_uuid}" if self.parent_uuid else ""
        checkpoint = f", starts checkpoint {self.checkpoint}" if self.checkpoint else ""
        return (f"archive {self.uuid}: kind {self.kind.name.lower()}{parent}{checkpoint}, "
                f"created {created} UTC, tool backup-agent {self.tool_version}")

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview) -> Header:
        c = _Cursor(body, "archive header record")
        raw_uuid, parent, created_ns, kind, enc, halgo, _r8, _r32 = c.unpack(_HEADER)
        try:
            kind_v = Kind(kind)
        except ValueError as e:
            raise UnsupportedArchive(f"archive kind {kind} is not supported") from e
        try:
            enc_v = Encryption(enc)
        except ValueError as e:
            raise UnsupportedArchive(f"archive encryption method {enc} is not supported") from e
        if halgo != HashAlgo.BLAKE3_128:
            raise UnsupportedArchive(f"archive digest algorithm {halgo} is not supported")
        tool_version = c.text(MAX_TEXT)
        checkpoint = c.text(MAX_TEXT)
        (enc_len,) = c.unpack(_U32)
        params = bytes(c.take(enc_len))
        if enc_v == Encryption.NONE:
            params = b""  # skipped, as the spec says
        props = c.props()
        return cls(
            uuid=UUID(bytes=bytes(raw_uuid)),
            created_ns=created_ns,
            tool_version=tool_version,
            kind=kind_v,
            parent_uuid=None if bytes(parent) == bytes(16) else UUID(bytes=bytes(parent)),
            checkpoint=checkpoint,
            encryption=enc_v,
            props=props,
            encryption_params=params,
        )


@dataclass(frozen=True)
class Details:
    """The DETAILS record of an encrypted archive: the header fields that describe the VM
    or the writer, sealed like every record after HEADER."""

    tool_version: str
    checkpoint: str
    props: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return _text(self.tool_version) + _text(self.checkpoint) + _props(self.props)

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview) -> Details:
        c = _Cursor(body, "details record")
        return cls(c.text(MAX_TEXT), c.text(MAX_TEXT), c.props())


_DEVICE = struct.Struct("<IQ")  # id, size


@dataclass(frozen=True)
class Device:
    id: int
    name: str
    size: int
    props: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return _DEVICE.pack(self.id, self.size) + _text(self.name) + _props(self.props)

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview) -> Device:
        c = _Cursor(body, "device record")
        dev_id, size = c.unpack(_DEVICE)
        name = c.text(MAX_NAME)
        props = c.props()
        check_name(name, "device")
        if size > MAX_DEVICE_SIZE:
            raise ArchiveError(f"device {name!r} claims a size of {size} bytes (limit 2^63-1)")
        return cls(dev_id, name, size, props)


_CONFIG = struct.Struct("<IQ")  # id, size


@dataclass(frozen=True)
class Config:
    id: int
    name: str
    size: int

    def encode(self) -> bytes:
        return _CONFIG.pack(self.id, self.size) + _text(self.name)

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview) -> Config:
        c = _Cursor(body, "config record")
        cfg_id, size = c.unpack(_CONFIG)
        name = c.text(MAX_NAME)
        check_name(name, "config")
        if size > MAX_DEVICE_SIZE:
            raise ArchiveError(f"config {name!r} claims a size of {size} bytes")
        return cls(cfg_id, name, size)


# DATA and CONFIG_DATA share one fixed part: target id, compression, offset, length.
_CHUNK = struct.Struct("<IBBHQII")  # id, compression, 0, 0, offset, length, 0
assert _CHUNK.size == 24
CHUNK_FIXED = _CHUNK.size


@dataclass(frozen=True)
class Chunk:
    """The fixed part of a DATA or CONFIG_DATA body; the stored payload follows it."""

    target: int  # device id (DATA) or config id (CONFIG_DATA)
    compression: Compression
    offset: int
    length: int  # uncompressed length

    def encode(self) -> bytes:
        return _CHUNK.pack(self.target, self.compression, 0, 0, self.offset, self.length, 0)

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview, what: str) -> Chunk:
        c = _Cursor(body, what)
        target, comp, _a, _b, offset, length, _c = c.unpack(_CHUNK)
        try:
            comp_v = Compression(comp)
        except ValueError as e:
            raise UnsupportedArchive(f"{what} uses unknown compression {comp}") from e
        if not 0 < length <= MAX_DATA_LENGTH:
            raise ArchiveError(f"{what} has a length of {length} (must be 1..{MAX_DATA_LENGTH})")
        stored = len(body) - CHUNK_FIXED
        if comp_v == Compression.NONE and stored != length:
            raise ArchiveError(f"{what} stores {stored} bytes but claims {length}")
        return cls(target, comp_v, offset, length)


_ZERO = struct.Struct("<IIQQ")  # device id, 0, offset, length


@dataclass(frozen=True)
class Zero:
    device: int
    offset: int
    length: int

    def encode(self) -> bytes:
        return _ZERO.pack(self.device, 0, self.offset, self.length)

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview) -> Zero:
        dev, _r, offset, length = _Cursor(body, "zero record").unpack(_ZERO)
        if length == 0:
            raise ArchiveError("zero record has a length of 0")
        return cls(dev, offset, length)


# Index entries locate every DATA and ZERO record for a reader that can seek.
INDEX_ENTRY = struct.Struct("<BBHIQQQ")  # rtype low byte, compression, 0, dev, offset, length, pos
assert INDEX_ENTRY.size == 32
INDEX_ENTRIES_PER_RECORD = 65536


@dataclass(frozen=True)
class IndexEntry:
    rtype: RecordType
    compression: Compression
    device: int
    offset: int
    length: int
    pos: int  # byte position of the record's frame header in the archive


def decode_index(body: bytes | bytearray | memoryview) -> list[IndexEntry]:
    if len(body) % INDEX_ENTRY.size:
        raise ArchiveError("index record has a partial entry")
    out = []
    for rt, comp, _r, dev, offset, length, pos in INDEX_ENTRY.iter_unpack(body):
        if rt not in (RecordType.DATA, RecordType.ZERO):
            raise ArchiveError(f"index entry has an unknown record type {rt}")
        try:
            out.append(IndexEntry(RecordType(rt), Compression(comp), dev, offset, length, pos))
        except ValueError as e:
            raise ArchiveError(f"index entry has an unknown compression {comp}") from e
    return out


_END = struct.Struct("<QQQQII32s")  # records, data, zero, stored, devices, configs, chain


@dataclass(frozen=True)
class End:
    """The seal: counts and the chained digest of every record before it."""

    records: int
    data_bytes: int
    zero_bytes: int
    stored_bytes: int
    devices: int
    configs: int
    chain: bytes

    def encode(self) -> bytes:
        return _END.pack(
            self.records, self.data_bytes, self.zero_bytes, self.stored_bytes,
            self.devices, self.configs, self.chain,
        )

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview) -> End:
        r, d, z, s, nd, nc, chain = _Cursor(body, "end record").unpack(_END)
        return cls(r, d, z, s, nd, nc, bytes(chain))


class Chain:
    """The running seal: BLAKE3 over the preamble, then each record's frame header and
    digest, in order. The preamble is in so that no bit of an archive goes unchecked."""

    def __init__(self, preamble: bytes) -> None:
        self._h = blake3.blake3(preamble)

    def add(self, frame_header: bytes | bytearray | memoryview, record_digest: bytes) -> None:
        self._h.update(frame_header)
        self._h.update(record_digest)

    def value(self) -> bytes:
        return bytes(self._h.digest(32))


# --- Footer ---------------------------------------------------------------------------

FOOTER_MAGIC = b"BAFOOTER"
FOOTER = struct.Struct("<8sQQQ16s")  # magic, index_pos, end_pos, archive_len, digest
assert FOOTER.size == 48
NO_INDEX = 2**64 - 1


@dataclass(frozen=True)
class Footer:
    index_pos: int  # first INDEX record, or NO_INDEX
    end_pos: int  # the END record
    archive_len: int  # bytes from the preamble through this footer

    def encode(self) -> bytes:
        prefix = FOOTER.pack(FOOTER_MAGIC, self.index_pos, self.end_pos, self.archive_len,
                             bytes(16))[:32]
        return prefix + blake3.blake3(prefix).digest(16)

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview, pos: int) -> Footer:
        if len(raw) != FOOTER.size:
            raise ArchiveError(f"the archive is truncated inside its footer at byte {pos}")
        magic, index_pos, end_pos, archive_len, dig = FOOTER.unpack(raw)
        if magic != FOOTER_MAGIC:
            raise ArchiveError(f"bad footer magic at byte {pos}")
        if blake3.blake3(memoryview(raw)[:32]).digest(16) != dig:
            raise ArchiveError(f"the footer at byte {pos} is damaged (digest mismatch)")
        return cls(index_pos, end_pos, archive_len)
