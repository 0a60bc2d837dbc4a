"""What an archive holds: header fields, devices, configs and totals, for ``info``."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

from agent.archive.format import Config, Device, End, Header
from agent.archive.indexed import IndexedArchive
from agent.archive.reader import ArchiveReader, DataRecord, open_stream
from agent.errors import AgentError
from agent.vma.detect import open_reader, plain_native


@dataclass(frozen=True)
class ArchiveInfo:
    header: Header
    devices: list[Device]
    configs: list[Config]
    end: End
    archive_bytes: int  # the archive's own length, without any padding after it
    archive_format: str = "native"  # or "vma" (Proxmox's; its seal: the header's MD5)

    def as_dict(self) -> dict[str, Any]:
        h, e = self.header, self.end
        return {
            "format": self.archive_format,
            "uuid": str(h.uuid),
            "created": h.created_ns / 1e9,
            "kind": h.kind.name.lower(),
            "parent_uuid": str(h.parent_uuid) if h.parent_uuid else None,
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


def archive_info(path: str) -> ArchiveInfo:
    """From the index of a seekable file, or by reading a stream to its end."""
    try:
        seekable = path.startswith("s3://") or (  # ranged GETs: only the ends are read
            path != "-" and stat.S_ISREG(os.stat(path).st_mode))
    except OSError as e:
        raise AgentError(f"cannot open {path}: {e.strerror}") from e
    if seekable and plain_native(path):
        with IndexedArchive(path) as arc:
            return ArchiveInfo(arc.header, arc.devices, arc.configs, arc.end, arc.archive_len)
    with open_stream(path) as f:
        reader = open_reader(f, verify_data=False, keep_configs=False)  # ours or VMA
        for rec in reader.records():
            if isinstance(rec, DataRecord):
                rec.release()
        if reader.end is None:  # records() returns only after a good END; be explicit
            raise AgentError(f"{path}: the archive has no end record")
        return ArchiveInfo(reader.header, reader.devices, reader.configs, reader.end,
                           reader.archive_len,
                           "native" if isinstance(reader, ArchiveReader) else "vma")
