"""A backup job: open every source, then stream them all into one archive.

Everything that can fail on bad input (a name given twice, a missing image or
config file, an unreachable server) fails before the first byte of the archive
is written. Every helper process and connection is closed on every way out, and
a named output file appears only when the archive is complete.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from agent.engine import EngineOptions
from agent.errors import InvalidArgument
from agent.nbd.source import NbdSource
from agent.pipeline import ProgressFn
from agent.writing import BackupSummary, read_configs, write_archive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackupJob:
    output: str  # a path, or "-" for standard output
    sources: list[tuple[str, str]] = field(default_factory=list)  # (name, NBD URI)
    images: list[tuple[str, str]] = field(default_factory=list)  # (name, image file)
    configs: list[tuple[str, str]] = field(default_factory=list)  # (name, file)
    engine: EngineOptions = field(default_factory=EngineOptions)


def _check_names(job: BackupJob) -> None:
    seen: set[str] = set()
    for name, _ in [*job.sources, *job.images]:
        if name in seen:
            raise InvalidArgument(f"device name {name!r} is given twice")
        seen.add(name)
    if not seen:
        raise InvalidArgument("nothing to back up: give at least one --source or --image")


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

        with write_archive(job.output, job.engine, progress) as arc:
            for name, src, props in opened:
                arc.add_device(name, src, props)
            for name, data in configs:
                arc.add_config(name, data)
            return arc.run()
    raise AssertionError("unreachable")  # for mypy: the with block returns or raises
