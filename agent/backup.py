"""A backup job: open every source, then stream them all into one archive.

Everything that can fail on bad input (a name given twice, a missing image or
config file, an unreachable server) fails before the first byte of the archive
is written. Every helper process and connection is closed on every way out, and
a named output file appears only when the archive is complete.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from agent import __version__
from agent.archive.format import Device, Header, Kind, new_archive_uuid
from agent.archive.output import SequentialOutput, open_output
from agent.archive.writer import ArchiveWriter
from agent.engine import BackupEngine, EngineOptions
from agent.errors import AgentError, InvalidArgument
from agent.nbd.source import NbdSource
from agent.pipeline import Progress, ProgressFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackupJob:
    output: str  # a path, or "-" for standard output
    sources: list[tuple[str, str]] = field(default_factory=list)  # (name, NBD URI)
    images: list[tuple[str, str]] = field(default_factory=list)  # (name, image file)
    configs: list[tuple[str, str]] = field(default_factory=list)  # (name, file)
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass(frozen=True)
class BackupSummary:
    uuid: uuid.UUID
    devices: list[Device]
    progress: Progress
    archive_bytes: int
    peak_buffer: int
    extra: dict[str, float] = field(default_factory=dict)  # live backups: what the guest cost
    kind: Kind = Kind.FULL
    parent: UUID | None = None  # the archive an incremental or differential builds on
    note: str = ""  # why the kind is not the one asked for, or why no checkpoint was started


def _check_names(job: BackupJob) -> None:
    seen: set[str] = set()
    for name, _ in [*job.sources, *job.images]:
        if name in seen:
            raise InvalidArgument(f"device name {name!r} is given twice")
        seen.add(name)
    if not seen:
        raise InvalidArgument("nothing to back up: give at least one --source or --image")


def read_configs(configs: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """Every --config file's bytes, read before anything starts; names checked once."""
    seen: set[str] = set()
    out = []
    for name, path in configs:
        if name in seen:
            raise InvalidArgument(f"config name {name!r} is given twice")
        seen.add(name)
        try:
            out.append((name, Path(path).read_bytes()))
        except OSError as e:
            raise AgentError(f"config {name!r}: cannot read {path}: {e.strerror}") from e
        log.debug("config %r: %d bytes from %s", name, len(out[-1][1]), path)
    return out


def run_backup(job: BackupJob, progress: ProgressFn | None = None) -> BackupSummary:
    _check_names(job)
    configs = read_configs(job.configs)
    conns = job.engine.connections_for(changes=False)
    with contextlib.ExitStack() as stack:
        opened: list[tuple[str, NbdSource, dict[str, str]]] = []
        for name, uri in job.sources:
            src = stack.enter_context(contextlib.closing(NbdSource(uri, conns, name)))
            log.debug("source %r: %s: %d bytes, %d connection(s) (%d asked; 1 unless the "
                      "server allows multi-conn)", name, uri, src.size, len(src.handles), conns)
            opened.append((name, src, {"source-format": "nbd"}))
        if job.images:  # qemu-nbd's module (subprocess, sockets) only when it runs
            from agent.nbd.qemu_nbd import QemuNbd, image_info
        for name, path in job.images:
            info = image_info(path)
            fmt = str(info.get("format", "raw"))
            log.debug("image %r: %s: format %s, %s bytes", name, path, fmt,
                      info.get("virtual-size"))
            server = stack.enter_context(QemuNbd(path, fmt, readonly=True, shared=conns))
            src = stack.enter_context(contextlib.closing(NbdSource(server.uri, conns, name)))
            log.debug("source %r: %s: %d bytes, %d connection(s) (%d asked)", name,
                      server.uri, src.size, len(src.handles), conns)
            props = {"source-format": fmt}
            if "cluster-size" in info:
                props["cluster-size"] = str(info["cluster-size"])
            opened.append((name, src, props))

        out = open_output(job.output)
        stack.callback(out.close)
        try:
            return _write(job, out, opened, configs, progress)
        except BaseException:
            out.abort()
            raise
    raise AssertionError("unreachable")  # for mypy: the with block returns or raises


def _write(
    job: BackupJob,
    out: SequentialOutput,
    opened: list[tuple[str, NbdSource, dict[str, str]]],
    configs: list[tuple[str, bytes]],
    progress: ProgressFn | None,
) -> BackupSummary:
    header = Header(uuid=new_archive_uuid(), created_ns=time.time_ns(), tool_version=__version__)
    log.debug("writing archive %s to %s", header.uuid, out.name)
    log.debug("%s", header.describe())
    writer = ArchiveWriter(out, header)
    pairs = [(writer.add_device(name, src.size, props), src) for name, src, props in opened]
    for dev, _ in pairs:
        log.debug("device %d %r: %d bytes (%s)", dev.id, dev.name, dev.size,
                  ", ".join(f"{k}={v}" for k, v in dev.props.items()))
    for name, data in configs:
        writer.add_config(name, data, job.engine.compression)
    result = BackupEngine(writer, pairs, job.engine, progress).run()
    writer.finish()
    out.commit()
    return BackupSummary(header.uuid, writer.devices, result.progress, out.position,
                         result.peak_buffer)
