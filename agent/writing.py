"""Writing one archive: the one path every backup, plain or live, takes from an output
name to a complete archive and its summary.

::

    open_output(OUTPUT) ─▶ header ─▶ devices, configs ─▶ the engine ─▶ index, end ─▶ commit
                                                                    any other way out: abort

:func:`write_archive` is the only code that opens an archive output and decides between
commit and abort, so what changes where archives go (an ``s3://`` output: another kind of
:func:`~agent.archive.output.open_output`) or how their records are sealed (encryption:
``EngineOptions.encrypt_to``, handed on to the writer) plugs in here once, for both kinds
of backup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from uuid import UUID

from agent import __version__
from agent.archive.codec import CompressionSpec
from agent.archive.format import Compression, Device, Header, Kind, new_archive_uuid
from agent.archive.output import SequentialOutput, open_output
from agent.archive.writer import ArchiveWriter
from agent.engine import BackupEngine, EngineOptions
from agent.errors import AgentError, InvalidArgument
from agent.nbd.source import NbdSource
from agent.pipeline import Progress, ProgressFn

if TYPE_CHECKING:
    from agent.live.stats import LiveStats
    from agent.tracker import DeviceTracker
    from agent.vma.writer import VmaWriter

log = logging.getLogger(__name__)


class BackupSummary(NamedTuple):  # (a frozen dataclass would cost 0.4 ms of start-up)
    uuid: UUID
    devices: list[Device]
    progress: Progress
    archive_bytes: int
    peak_buffer: int
    live: LiveStats | None = None  # live backups: what the guest's writes cost
    kind: Kind = Kind.FULL
    parent: UUID | None = None  # the archive an incremental or differential builds on
    note: str = ""  # why the kind is not the one asked for, or why no checkpoint was started


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


class ArchiveSession:
    """An archive being written: add its devices and configs, then :meth:`run` it once."""

    def __init__(self, out: SequentialOutput, header: Header, opts: EngineOptions,
                 progress: ProgressFn | None) -> None:
        self.header = header
        self.writer: ArchiveWriter | VmaWriter
        if opts.archive_format == "vma":
            # Proxmox's format: clusters stored as they are (checked by write_archive).
            from agent.vma.writer import VmaWriter  # only when asked for

            self.writer = VmaWriter(out, header)
            opts = dataclasses.replace(opts, compression=CompressionSpec(Compression.NONE, 0))
        else:
            self.writer = ArchiveWriter(out, header, encrypt_to=opts.encrypt_to)
        self.committed = False
        self._out = out
        self._opts = opts
        self._progress = progress
        self._sources: list[tuple[Device, NbdSource]] = []

    def add_device(self, name: str, source: NbdSource, props: Mapping[str, str]) -> Device:
        dev = self.writer.add_device(name, source.size, props)
        log.debug("device %d %r: %d bytes (%s)", dev.id, dev.name, dev.size,
                  ", ".join(f"{k}={v}" for k, v in dev.props.items()))
        self._sources.append((dev, source))
        return dev

    def add_config(self, name: str, data: bytes) -> None:
        self.writer.add_config(name, data, self._opts.compression)

    def engine(self, trackers: Mapping[int, DeviceTracker] | None = None,
               total: int | None = None) -> BackupEngine:
        """The engine that copies the devices added. A live backup passes its trackers (by
        the archive's device id) and hands the engine's control to its helper threads
        before :meth:`run`; ``total``: the bytes progress counts to (default: all)."""
        return BackupEngine(self.writer, self._sources, self._opts, self._progress, trackers,
                            total)

    def run(self, engine: BackupEngine | None = None) -> BackupSummary:
        """Copy every device, seal the archive and commit it: from here on it is complete."""
        self._out.expect(sum(dev.size for dev, _ in self._sources))  # an upload's part size
        result = (engine or self.engine()).run()
        self.writer.finish()
        self._out.commit()
        self.committed = True
        h = self.header
        return BackupSummary(h.uuid, self.writer.devices, result.progress, self._out.position,
                             result.peak_buffer, kind=h.kind, parent=h.parent_uuid)


def check_format(opts: EngineOptions, kind: Kind = Kind.FULL) -> None:
    """Refuse what the chosen archive format cannot hold, before anything is opened."""
    if opts.archive_format == "native":
        return
    if opts.archive_format != "vma":
        raise InvalidArgument(f"unknown archive format {opts.archive_format!r} (use native "
                              "or vma)")
    if kind != Kind.FULL:
        raise InvalidArgument(f"a VMA archive holds only full backups, not a "
                              f"{kind.name.lower()} one: use --mode full, or the native "
                              "format")


@contextlib.contextmanager
def write_archive(output: str, opts: EngineOptions, progress: ProgressFn | None = None, *,
                  uuid: UUID | None = None, kind: Kind = Kind.FULL, parent: UUID | None = None,
                  checkpoint: str = "",
                  props: Mapping[str, str] | None = None) -> Iterator[ArchiveSession]:
    """Open ``output`` (a path, or ``-`` for standard output), write the header, and yield
    the session that adds devices and configs and runs the engine. Leaving the block any
    other way than after :meth:`ArchiveSession.run` aborts: nothing is left that could be
    taken for a complete archive.

    The keyword arguments are the header's fields the caller decides (the creation time
    and the tool's version are filled in here): ``uuid`` (default: a new one; a live backup
    names its checkpoints after it first), ``kind`` and ``parent`` (the archive an
    incremental or differential builds on), ``checkpoint`` (the dirty bitmap it starts),
    ``props`` (the header's properties: a live backup's ``consistency``)."""
    check_format(opts, kind)
    out = open_output(output)
    session = None
    try:
        header = Header(uuid=new_archive_uuid() if uuid is None else uuid,
                        created_ns=time.time_ns(), tool_version=__version__, kind=kind,
                        parent_uuid=parent, checkpoint=checkpoint, props=dict(props or {}))
        log.debug("writing archive %s to %s", header.uuid, out.name)
        log.debug("%s", header.describe())
        session = ArchiveSession(out, header, opts, progress)
        yield session
    finally:
        try:
            if session is None or not session.committed:
                out.abort()
        finally:
            out.close()
