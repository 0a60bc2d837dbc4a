"""Restore: archive stream in, devices out, the pull pipeline in reverse.

One thread reads the archive sequentially (it may be a pipe) and checks each DATA
record's digest as it reads it, and gathers the records of one device into batches
(up to BATCH_BYTES of device data or BATCH_RECORDS records, handed over early whenever
the archive stalls). A pool of workers takes the batches, in parallel and in any order;
a worker decompresses its batch's records in offset order and writes each run of
adjacent ones together (``Target.writev``: one pwritev into a file; into an NBD export,
still one request per record). Zero ranges become holes, trims or write-zeroes, never
written zeros; on a target that reads as zeros already (a new file) they cost nothing,
nor does a DATA record that decompresses to zeros. Records read but not yet written are bounded
by ``RestoreOptions.memory``. A chain is applied one archive after another, each one
wholly written before the next starts.

A device restored into a new file (``--to-dir``) is written under a temporary
name and renamed into place only after the archive's END seal checked out and
every write succeeded, so a damaged or truncated archive never leaves a file
that looks complete. The temporary file is one the restore made itself (mode 0600,
a random name: agent/files.py), and the rename never replaces a file that appeared
meanwhile, so two restores into one directory never mix up their files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import stat
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from agent import interrupts
from agent.archive.format import CHUNK_FIXED, Device
from agent.archive.reader import (
    RECORD_OVERHEAD,
    ArchiveReader,
    DataRecord,
    SpareBuffers,
    ZeroRecord,
)
from agent.chain import Link, check_chain
from agent.errors import AgentError, Interrupted, InvalidArgument, TargetError
from agent.files import (
    Leftovers,
    create_private,
    make_dirs,
    remove_made_dirs,
    same_file,
    short_name,
)
from agent.options import RestoreOptions as RestoreOptions  # re-exported for its users
from agent.pipeline import ByteBudget, Control, Meter, Progress, ProgressFn
from agent.targets.base import ZEROS, Sink, SinkFactory, Target
from agent.targets.file import FileTarget
from agent.targets.null import NullTarget
from agent.units import MiB
from agent.vma.detect import open_reader

if TYPE_CHECKING:
    from agent.vma.reader import VmaReader

# Records go to the workers in batches of up to this many device bytes or records: a
# task costs the reading thread some 30 us (future, queue, budget, GIL hand-offs), about
# what decompressing and writing a 64 KiB record takes. 2 MiB records go two at a time.
# Past 4 MiB, larger batches gained nothing (docs/PERFORMANCE.md, "Small records").
BATCH_BYTES = 4 * MiB
BATCH_RECORDS = 64

log = logging.getLogger(__name__)


@dataclass
class RestoreResult:
    progress: Progress
    devices: list[str]  # names restored
    outputs: list[str]  # where each went
    archive_bytes: int = 0  # of the archives read, without tape padding


def to_dir(directory: Path, fmt: str, names: set[str] | None, opts: RestoreOptions) -> SinkFactory:
    """Sinks that create ``DIR/NAME.raw`` or ``DIR/NAME.qcow2`` for each device (a name too
    long for one directory entry is shortened: see agent.files.short_name).

    DIR is created with the first sink, once the archive's header and devices have been
    read: a missing archive leaves no directory behind, and a restore that fails removes
    the directories it created (never one it did not)."""
    if fmt not in ("raw", "qcow2"):
        raise InvalidArgument(f"unknown output format {fmt!r} (use raw or qcow2)")
    made: list[Path] = []  # shared by the sinks: whichever is discarded last removes them
    leftovers: Leftovers | None = None  # DIR's temporary files, read once for every device

    def make(dev: Device) -> Sink | None:
        nonlocal leftovers
        if names is not None and dev.name not in names:
            return None
        made.extend(_make_dir(directory))
        leftovers = leftovers or Leftovers(directory)
        final = directory / short_name(dev.name, f".{fmt}")
        try:
            if os.path.lexists(final):  # a dangling symbolic link too
                raise TargetError(f"{final} already exists: remove it or restore elsewhere")
            fd, temp = _create_temp(final, leftovers)
        except BaseException:
            remove_made_dirs(made)
            raise
        try:
            return _new_file_sink(dev, fmt, final, temp, fd, opts, made)
        except BaseException:
            _unlink(temp)  # whatever failed, after the file was created
            remove_made_dirs(made)
            raise

    return make


def _create_temp(final: Path, leftovers: Leftovers) -> tuple[int, Path]:
    """A new private file beside ``final`` (agent.files.create_private)."""
    try:
        return create_private(final.parent, final.name, leftovers=leftovers)
    except OSError as e:
        hint = " (restore fewer at once: --open-targets N)" if e.errno == errno.EMFILE else ""
        raise TargetError(f"cannot create a file in {final.parent}: {e.strerror}{hint}") from e


def _new_file_sink(dev: Device, fmt: str, final: Path, temp: Path, fd: int,
                   opts: RestoreOptions, made: list[Path]) -> Sink:
    """A sink writing ``dev`` into the new file ``temp`` (open as ``fd``, which it takes
    over), renamed to ``final`` on commit."""
    label = f"{final} (device {dev.name!r})"  # messages name the file the user asked for
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    ident = (st.st_dev, st.st_ino)
    if fmt == "raw":
        target = FileTarget(str(temp), dev.size, fresh=True, label=label, fd=fd)

        def reopen_raw() -> tuple[Target, QemuNbd | None, int]:
            fd = _reopen_temp(temp, ident, label, dev.size)
            return FileTarget(str(temp), label=label, fd=fd), None, -1

        return Sink(dev, target, final, temp, made_dirs=made, reopen=reopen_raw,
                    ident=ident)
    # Imported here: restores into files never load libnbd (start-up time).
    from agent.nbd.qemu_nbd import QemuNbd
    from agent.targets.nbd import NbdTarget

    try:
        # qemu-img and qemu-nbd open the file by name: it stays 0600 (qemu-img keeps an
        # existing file's mode), and must still be the file made above when they are done.
        _create_qcow2(temp, dev.size, label)
    except BaseException:
        os.close(fd)
        raise

    def serve(lock_fd: int, fresh: bool) -> tuple[Target, QemuNbd | None, int]:
        """The image served by a qemu-nbd of ours, through ``lock_fd`` (taken over)."""
        try:
            server = QemuNbd(str(temp), "qcow2", readonly=False, shared=opts.connections,
                             extra=("--discard=unmap",))
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            if not same_file(lock_fd, temp):
                raise TargetError(f"{temp} was replaced while the restore created it: "
                                  f"is {temp.parent} writable by others?")
            target = NbdTarget(server.uri, opts.connections, fresh=fresh, label=label)
        except BaseException:
            server.close()
            os.close(lock_fd)
            raise
        return target, server, lock_fd

    nbd, server, _ = serve(fd, True)
    return Sink(dev, nbd, final, temp, server, made_dirs=made, lock_fd=fd,
                reopen=lambda: serve(_reopen_temp(temp, ident, label), False), ident=ident)


def _reopen_temp(temp: Path, ident: tuple[int, int], label: str, size: int = -1) -> int:
    """``temp`` open for writing and locked again, if it is still the file this restore made
    (``ident``: its device and inode; ours; ``size`` bytes long unless -1): a suspended
    target's file, closed meanwhile. (An inode number may be reused once a file is gone:
    what someone else put there is told apart by its owner.)"""
    try:
        st = os.lstat(temp)
        if (stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == ident
                and st.st_uid == os.geteuid() and size in (-1, st.st_size)):
            # Not a FIFO (checked above, and O_NONBLOCK if one took its place since): an
            # open that waited for a reader would hang the restore.
            fd = os.open(temp, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == ident:
                os.set_blocking(fd, True)
                with contextlib.suppress(OSError):  # "in use": see agent.files
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            os.close(fd)
    except OSError as e:
        raise TargetError(f"{label}: cannot open its temporary file {temp} again: "
                          f"{e.strerror}") from e
    raise TargetError(f"{label}: its temporary file {temp} was replaced while the restore "
                      f"ran: is {temp.parent} writable by others?")


def _make_dir(directory: Path) -> list[Path]:
    """Create ``directory`` if missing; the directories created."""
    try:
        return make_dirs(directory)
    except OSError as e:
        raise TargetError(f"cannot create {directory}: {e.strerror}") from e


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def to_target(name: str, target: str, opts: RestoreOptions) -> SinkFactory:
    """A sink writing device ``name`` into an existing file, block device or NBD export."""

    def make(dev: Device) -> Sink | None:
        if dev.name != name:
            return None
        t: Target
        if "://" in target:
            from agent.targets.nbd import NbdTarget

            t = NbdTarget(target, opts.connections)
        else:
            if not os.path.exists(target):
                raise TargetError(f"{target}: no such file or device (create it first, "
                                  "or use --to-dir)")
            t = FileTarget(target)
        if t.size < dev.size:
            t.close()
            raise TargetError(f"{target} holds {t.size} bytes, device {name!r} needs {dev.size}")
        return Sink(dev, t, in_place=True)

    return make


def _create_qcow2(path: Path, size: int, label: str) -> None:
    import subprocess  # here: a restore into raw files never starts a process

    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                       check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", None)
        lines = (err if isinstance(err, str) and err.strip() else str(e)).strip().splitlines()
        raise TargetError(f"cannot create {label}: {lines[-1]}") from e


_FDS_SPARE = 256  # the archives, pipes, the pool's threads, libraries
_FDS_PER_SERVER = 2  # a qemu-nbd's log and pipe, besides its connections


def _allow_open_files(n: int) -> None:
    """Raise the soft limit of open files to ``n`` if the hard limit allows (up to it if
    not): an archive may hold more devices than the usual soft limit of 1,024 files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= n:
        return
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class RestoreEngine:
    """Applies archives in order onto the sinks made for the first one's devices.

    Each archive's records are written in parallel; the next archive starts only when all of
    them are on the targets, so a later archive's record always lands over an earlier one's.
    Targets are committed once, after the last archive's seal checked out.

    At most ``open_targets`` sinks are open at once. The first devices' are made before any
    record is read, as many as may be open (all of them, in an archive of a few devices);
    the others' when their first record arrives (those with none once the first archive's
    seal checked out: an empty target of the device's size). To open one more, the least
    recently used sink that no worker is writing is suspended (closed, its file kept) and
    resumed when a record comes for it again, or to commit it. An archive of 40,000 devices
    once opened 40,000 files, or started as many qemu-nbd processes, before reading a
    record.
    """

    def __init__(self, readers: Sequence[ArchiveReader | VmaReader], make_sink: SinkFactory,
                 opts: RestoreOptions, progress: ProgressFn | None = None,
                 wanted: Collection[str] | None = None) -> None:
        self.readers = list(readers)
        self.opts = opts
        self.progress = progress
        self.control = Control()
        self.budget = ByteBudget(opts.memory, self.control)
        self._make_sink = make_sink
        self.sinks: dict[str, Sink] = {}  # by device name: ids differ between archives
        self._unwanted: set[str] = set()  # devices the factory gave no sink
        self._open: dict[str, None] = {}  # names of open sinks that can suspend, LRU first
        self._busy: dict[str, int] = {}  # batches of a sink made and not yet applied
        self._fresh = True  # targets are new: until the first archive is on them
        devices = self.readers[0].devices
        # Only so many targets are open: files, or images' qemu-nbd and connections.
        open_max = min(len(devices), max(1, opts.open_targets))
        _allow_open_files(_FDS_SPARE + open_max * (opts.connections + _FDS_PER_SERVER))
        self._total = sum(d.size for d in devices if wanted is None or d.name in wanted)
        self._lock = threading.Lock()
        self.meter = self._meter(0)
        self._tasks = 0  # batches handed to the workers and not yet done
        self._tasks_done = threading.Condition()
        # The first devices' sinks now, as many as may be open: every target of an archive
        # of a few devices is checked (exists, is large enough) before a record is read.
        try:
            for dev in devices:
                if len(self._open) >= max(1, opts.open_targets):
                    break
                self._sink_for(dev)
        except BaseException:
            self._discard()
            raise

    def _meter(self, i: int) -> Meter:
        n = len(self.readers)
        phase = "restore" if n == 1 else f"restore {i + 1}/{n}"
        # Only a full backup's size is known before its end: later archives hold the changes.
        return Meter(phase, self._total if i == 0 else 0, self.progress)

    def _sink_for(self, dev: Device) -> Sink | None:
        """``dev``'s sink, open (made now if it was never asked for), or None if the
        factory wants no sink for it. Called by the reading thread only."""
        name = dev.name
        sink = self.sinks.get(name)
        if sink is not None and sink.is_open:
            if name in self._open:
                self._open[name] = self._open.pop(name)  # the most recently used now
            return sink
        if sink is None and name in self._unwanted:
            return None
        self._make_room()
        if sink is None:
            sink = self._make_sink(dev)
            if sink is None:
                self._unwanted.add(name)
                return None
            self.sinks[name] = sink
            # A target waiting on a stalled server gives up once the restore stops (Ctrl-C,
            # SIGTERM, another worker's error), so the workers it blocks can be joined and
            # every connection and helper closed promptly.
            sink.target.stop_when(self.control.stopped)
            if not self._fresh:
                sink.target.fresh = False
        else:
            sink.resume(self._fresh, self.control.stopped)
        if sink.reopen is not None:
            self._open[name] = None
        return sink

    def _make_room(self) -> None:
        """Suspend open sinks until one more may open: the least recently used first that
        no batch is for (waiting for the workers if every one has batches in flight)."""
        while len(self._open) >= max(1, self.opts.open_targets):
            with self._tasks_done:
                idle = next((n for n in self._open if not self._busy.get(n)), None)
                if idle is None:
                    self._tasks_done.wait(interrupts.STEP)
            if idle is None:
                self.control.check_failed()
                continue
            del self._open[idle]
            self.sinks[idle].suspend()

    def _make_the_rest(self) -> None:
        """The sinks of devices that had no record in the first archive: empty targets."""
        for dev in self.readers[0].devices:
            if dev.name not in self.sinks and dev.name not in self._unwanted:
                self._sink_for(dev)

    def run(self) -> RestoreResult:
        started = time.monotonic()
        finals: list[Progress] = []  # one per archive
        try:
            for i, reader in enumerate(self.readers):
                if i:
                    self.meter = self._meter(i)
                self._apply_archive(reader)
                if i == 0:
                    self._make_the_rest()
                # Written now: the next archive's zero ranges must really be zeroed.
                self._fresh = False
                for sink in self.sinks.values():
                    sink.target.fresh = False
                finals.append(self.meter.final())
            # The open ones first, so that resuming a suspended one never opens one too many.
            for sink in sorted(self.sinks.values(), key=lambda s: not s.is_open):
                if not sink.is_open:
                    sink.resume(False, self.control.stopped)
                sink.commit()
        except BaseException as e:
            self._discard()
            spoiled = [s.where for s in self.sinks.values() if s.in_place and s.touched]
            told = _partly_written(e, spoiled) if spoiled else None
            if told is not None:
                raise told from e
            raise
        progress = Progress(
            "restore", sum(p.done for p in finals),
            sum(s.device.size for s in self.sinks.values()),
            sum(p.data_bytes for p in finals), sum(p.zero_bytes for p in finals),
            sum(p.stored_bytes for p in finals), time.monotonic() - started)
        done = [self.sinks[d.name] for d in self.readers[0].devices if d.name in self.sinks]
        return RestoreResult(progress, [s.device.name for s in done], [s.where for s in done],
                             sum(r.archive_len for r in self.readers))

    def _apply_archive(self, reader: ArchiveReader | VmaReader) -> None:
        pool = ThreadPoolExecutor(self.opts.workers, thread_name_prefix="ba-restore")
        batch: _Batch | None = None  # records not yet handed to a worker

        def submit() -> None:
            nonlocal batch
            if batch is not None:
                self.control.check_failed()  # no more writes once a worker failed
                with self._tasks_done:
                    self._tasks += 1
                with interrupts.held():  # submit() may start a worker thread
                    pool.submit(self.control.guard_call, self._apply, batch)
                batch = None

        reader.on_input_wait = submit  # a stalled pipe holds no record back from the workers
        try:
            for rec in reader.records():
                self.control.check_failed()
                name = rec.device.name
                if batch and batch.sink.device.name != name and name not in self._unwanted:
                    submit()  # before opening another sink, which may wait for the workers
                sink = self._sink_for(rec.device)
                if sink is None:
                    if isinstance(rec, DataRecord):
                        rec.release()  # its buffers are the reader's to reuse
                    continue
                if batch and batch.length + rec.length > BATCH_BYTES:
                    submit()
                # What the record holds as allocated (its buffers and objects), not its
                # length: 1-byte records in 64 KiB buffers once took a restore with
                # --memory 1M to 2.7 GB.
                cost = rec.reserve() if isinstance(rec, DataRecord) else RECORD_OVERHEAD
                if not self.budget.acquire(cost, block=False):
                    submit()  # never wait for the workers while holding records back from them
                    while not self.budget.acquire(cost):
                        self.control.check_failed()
                if batch is None:
                    batch = _Batch(sink)
                    with self._tasks_done:  # workers count down under it
                        self._busy[name] = self._busy.get(name, 0) + 1
                batch.add(rec, cost)
                if batch.length >= BATCH_BYTES or len(batch.records) == BATCH_RECORDS:
                    submit()
            submit()
            # In steps, not in shutdown(), so that Ctrl-C is answered: see agent.interrupts.
            with self._tasks_done:
                while self._tasks:
                    self._tasks_done.wait(interrupts.STEP)
            pool.shutdown(wait=True)  # every task is done: at once
            self.control.check_failed()
        except BaseException as e:
            self.control.fail(e)
            pool.shutdown(wait=True, cancel_futures=True)
            # Ctrl-C reaches the agent's own qemu-nbd too (one process group): a write its
            # death failed first is a consequence, the interrupt is what to report.
            if isinstance(e, (KeyboardInterrupt, Interrupted)):
                raise
            if self.control.error is not e and self.control.error is not None:
                raise self.control.error from None
            raise

    def _apply(self, batch: _Batch) -> None:
        sink, target = batch.sink, batch.sink.target
        data = zero = stored = 0
        run: list[DataRecord] = []  # adjacent data records: one write
        parts: list[bytes | bytearray | memoryview] = []  # what they decompressed to

        def write_run() -> None:
            if run:
                # their digests were checked as the reader read them
                target.writev(run[0].offset, parts)
                for r in run:
                    r.release()
                run.clear()
                parts.clear()

        try:
            sink.touched = True  # before any request: a failed one may have written part
            # In offset order, which the archive's completion order is only nearly: records
            # of one archive never overlap, so any order lands the same bytes.
            for rec in sorted(batch.records, key=_offset):
                if isinstance(rec, DataRecord):
                    data += rec.length
                    stored += rec.raw.body.nbytes - CHUNK_FIXED  # as the backup counts them
                    payload = rec.data()
                    if target.fresh and is_zero(payload):
                        # A new target reads as zeros there already: writing them would only
                        # allocate them (36 KB of archive once filled a 1 GiB file).
                        write_run()
                        rec.release()
                        continue
                    if run and run[-1].offset + run[-1].length != rec.offset:
                        write_run()
                    run.append(rec)
                    parts.append(payload)
                else:
                    write_run()
                    target.zero(rec.offset, rec.length)
                    zero += rec.length
            write_run()
            with self._lock:
                self.meter.add(data=data, zero=zero, stored=stored)
        finally:
            self.budget.release(batch.cost)
            with self._tasks_done:
                self._busy[sink.device.name] -= 1  # it may be suspended now
                self._tasks -= 1
                self._tasks_done.notify_all()

    def _discard(self) -> None:
        for sink in self.sinks.values():
            sink.discard()


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is all zero bytes: a memcmp against the shared zero buffer, which
    stops at the first byte that is not zero, so ordinary data costs next to nothing
    (all zeros: 11 GB/s here; no copy)."""
    return ZEROS.startswith(data)


def _offset(rec: DataRecord | ZeroRecord) -> int:
    return rec.offset


class _Batch:
    """Records of one device that go to a worker as one task."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.records: list[DataRecord | ZeroRecord] = []
        self.length = 0  # device bytes
        self.cost = 0  # budget bytes

    def add(self, rec: DataRecord | ZeroRecord, cost: int) -> None:
        self.records.append(rec)
        self.length += rec.length
        self.cost += cost


def _partly_written(e: BaseException, where: list[str]) -> AgentError | None:
    """``e``, saying that the existing targets in ``where`` now hold part of the restore
    and so are neither their old contents nor the device (None: leave ``e`` as it is)."""
    note = f"{', '.join(where)} was partly written and is not a complete restore"
    if isinstance(e, AgentError):
        # Of the same class, for callers that tell errors apart; each takes just a message.
        return type(e)(f"{e}; {note}")
    if isinstance(e, KeyboardInterrupt):
        return Interrupted(f"interrupted; {note}")
    return None  # a bug: reported as one, with its own type and message


def restore(
    stream: BinaryIO, make_sink: SinkFactory, opts: RestoreOptions,
    progress: ProgressFn | None = None, wanted: Collection[str] | None = None,
) -> RestoreResult:
    """Restore every device the sink factory accepts from one archive stream."""
    return restore_chain([(stream, "the archive")], make_sink, opts, progress, wanted,
                         single=True)


def restore_chain(
    streams: Sequence[tuple[BinaryIO, str]], make_sink: SinkFactory, opts: RestoreOptions,
    progress: ProgressFn | None = None, wanted: Collection[str] | None = None,
    single: bool = False,
) -> RestoreResult:
    """Restore a chain: a full backup, then each incremental or differential over it, in
    order. ``streams`` pairs each archive with how the user named it (for messages). Every
    archive's header is read and the chain checked before anything is written. ``single``:
    a lone archive of any kind (``verify`` checks an incremental on its own)."""
    # One set of spare buffers for the chain (read one archive after another), kept
    # within the same bound as the records in flight.
    spares = SpareBuffers(opts.memory)
    # Ours or Proxmox's VMA, compressed as a whole or not: told by the first bytes.
    readers = [open_reader(s, keep_configs=False, spares=spares, keys=opts.keys, label=label)
               for s, label in streams]
    if wanted is not None:
        names = {d.name for d in readers[0].devices}
        missing = sorted(set(wanted) - names)
        if missing:
            raise InvalidArgument(
                f"no device named {', '.join(map(repr, missing))} in the archive "
                f"(it has: {', '.join(sorted(names)) or 'none'})"
            )
    if not single:
        check_chain([Link(label, r.header, r.devices)
                     for r, (_, label) in zip(readers, streams, strict=True)], wanted)
    return RestoreEngine(readers, make_sink, opts, progress, wanted).run()


def to_null() -> SinkFactory:
    """Sinks for verification: every record is checked and decompressed, nothing kept."""
    return lambda dev: Sink(dev, NullTarget(dev))
