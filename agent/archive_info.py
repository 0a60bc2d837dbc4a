"""What an archive holds: header fields, devices, configs and totals, for ``info``."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.archive.crypto import KeyRequired, stanzas
from agent.archive.format import Config, Device, Encryption, End, Header
from agent.archive.indexed import IndexedArchive
from agent.archive.reader import ArchiveReader, DataRecord, open_stream
from agent.errors import AgentError
from agent.vma.detect import open_reader, plain_native

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey


@dataclass(frozen=True)
class ArchiveInfo:
    header: Header
    devices: list[Device]
    configs: list[Config]
    end: End | None  # None: encrypted, and no key given (only the clear fields are known)
    archive_bytes: int  # the archive's own length, without any padding after it
    archive_format: str = "native"  # or "vma" (Proxmox's; its seal: the header's MD5)

    def recipients(self) -> list[str] | None:
        """The fingerprints of the keys an encrypted archive is for; None if it is plain."""
        if self.header.encryption == Encryption.NONE:
            return None
        return [s.fingerprint.hex() for s in stanzas(self.header.encryption_params)]

    def as_dict(self) -> dict[str, Any]:
        h, e = self.header, self.end
        clear: dict[str, Any] = {
            "format": self.archive_format,
            "uuid": str(h.uuid),
            "created": h.created_ns / 1e9,
            "kind": h.kind.name.lower(),
            "parent_uuid": str(h.parent_uuid) if h.parent_uuid else None,
            "encrypted_to": self.recipients(),
        }
        if e is None:
            return {**clear, "locked": True}  # everything else is encrypted
        return {**clear,
            "checkpoint": h.checkpoint or None,
            "tool_version": h.tool_version,
            "properties": dict(h.props),  # a live backup's "consistency", "frozen-mountpoints"
            "devices": [{"name": d.name, "size": d.size, "properties": dict(d.props)}
                        for d in self.devices],
            "configs": [{"name": c.name, "size": c.size} for c in self.configs],
            "seal": e.chain.hex(),  # BLAKE3-256 over every record: keep it to detect tampering
            "totals": {
                "device_bytes": sum(d.size for d in self.devices),
                "data_bytes": e.data_bytes,
                "zero_bytes": e.zero_bytes,
                "stored_bytes": e.stored_bytes,  # device data as stored, for the ratio
                "config_bytes": sum(c.size for c in self.configs),
                "archive_bytes": self.archive_bytes,
                "records": e.records,
            },
        }


def archive_info(path: str, keys: Sequence[X25519PrivateKey] = (),
                 label: str = "the archive") -> ArchiveInfo:
    """From the index of a seekable file, or by reading a stream to its end. An encrypted
    archive is read to its end with ``keys``; without them only its clear fields are known
    (``end`` None)."""
    try:
        seekable = path.startswith("s3://") or (  # ranged GETs: only the ends are read
            path != "-" and stat.S_ISREG(os.stat(path).st_mode))
    except OSError as e:
        raise AgentError(f"cannot open {path}: {e.strerror}") from e
    s3 = path.startswith("s3://")
    if s3:
        return _indexed_info(path, keys, label, None)
    if seekable:
        try:
            file = open(path, "rb")  # noqa: SIM115 (closed below)
        except OSError as e:
            raise AgentError(f"cannot open {path}: {e.strerror}") from e
        with file:  # sniffed and read through one descriptor: one file, whatever the path does
            if plain_native(file):
                return _indexed_info(path, keys, label, file)
    with open_stream(path) as f:
        try:  # ours or VMA
            reader = open_reader(f, verify_data=False, keep_configs=False, keys=keys,
                                 label=label)
        except KeyRequired as e:
            return ArchiveInfo(e.header, [], [], None,
                               os.path.getsize(path) if seekable and not s3 else 0)
        for rec in reader.records():
            if isinstance(rec, DataRecord):
                rec.release()
        if reader.end is None:  # records() returns only after a good END; be explicit
            raise AgentError(f"{path}: the archive has no end record")
        return ArchiveInfo(reader.header, reader.devices, reader.configs, reader.end,
                           reader.archive_len,
                           "native" if isinstance(reader, ArchiveReader) else "vma")


def _indexed_info(path: str, keys: Sequence[X25519PrivateKey], label: str,
                  f: BinaryIO | None) -> ArchiveInfo:
    """From the ends of a seekable archive (``f``: ``path`` open, or None: an object)."""
    try:
        with IndexedArchive(path, keys, label, f=f) as arc:
            return ArchiveInfo(arc.header, arc.devices, arc.configs, arc.end, arc.archive_len)
    except KeyRequired as e:  # encrypted, no key: what is in the clear, and its length
        return ArchiveInfo(e.header, [], [], None,
                           0 if f is None else os.fstat(f.fileno()).st_size)
