"""The backup pull pipeline: NBD exports in, archive records out, in completion order.

::

    planner ──(block status, one window at a time)──▶ zero ranges ─────────────┐
        │                                                                      ▼
        └─▶ read pieces ──▶ reader thread per connection ──▶ worker pool ──▶ writer
            (buffer pool)    (libnbd aio, many in flight)    (zero check,    (one thread,
                                                              zstd, BLAKE3)   sequential)

- Block status is asked one window at a time as the copy advances, never for the
  whole disk first, so an 8 TiB sparse disk produces records at once.
- Reads go into reused buffers from a pool that caps the bytes out at once at
  ``memory`` (buffers from 64 KiB up to ``request_size``: an incremental's small reads
  take small ones); a buffer returns to the pool only when its records are written, so
  a slow output slows the reads and never grows memory.
- Records are written as they complete. The archive accepts any order, so all
  connections stay busy even when the output is a pipe.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import nbd

from agent import interrupts
from agent.archive import codec
from agent.archive.format import Compression, Device
from agent.archive.writer import ArchiveWriter, data_body_digest
from agent.errors import SourceError
from agent.nbd.source import NbdSource
from agent.options import EngineOptions as EngineOptions  # re-exported for its users
from agent.pace import PaceSpec, SweepPacer
from agent.pipeline import POLL, BufferPool, Control, Meter, Progress, ProgressFn
from agent.tracker import DeviceTracker
from agent.units import MiB

if TYPE_CHECKING:
    from agent.vma.writer import VmaWriter

ZERO_BLOCK = 64 * 1024  # data that reads as zeros is found and recorded at this grain
STATUS_MIN_CHANGED = 4 * MiB  # smaller changed runs are read without asking block status
GATHER_PARTS = 16  # ranges at most in one gathered read (QEMU serves 16 requests at once)
# QEMU's NBD server (qemu-nbd's too) mallocs a buffer per request, and glibc maps large
# ones afresh and unmaps them on free: a fresh qemu-nbd spent 0.63-0.74 CPU-s per GiB
# serving 2 MiB requests, mostly in page faults, and 0.39 serving 512 KiB ones. A 2 MiB
# read (one buffer, one record) is therefore sent as four requests.
MAX_REQUEST = 512 * 1024
# A reader held back by the sweep's pace with nothing in flight looks for new copies
# this often (seconds): copies wait in the target's memory, and are never paced.
PACE_NAP = 0.02


@dataclass(frozen=True)
class _Read:
    device: Device
    offset: int
    length: int


@dataclass(frozen=True)
class _Gather:
    """Small ranges of one device read into one buffer, one after another, and handled as
    one unit from then on: an incremental's scattered clusters cost one hand-off between
    the pipeline's threads per unit instead of one per cluster."""

    device: Device
    parts: tuple[tuple[int, int], ...]  # (offset, length), in the buffer in this order

    @property
    def length(self) -> int:
        return sum(n for _, n in self.parts)


def _parts(item: _Read | _Gather) -> tuple[tuple[int, int], ...]:
    return item.parts if isinstance(item, _Gather) else ((item.offset, item.length),)


def _requests(item: _Read | _Gather) -> tuple[tuple[int, int], ...]:
    """The NBD reads that fill an item's buffer: a gather's parts, or a read cut into
    requests of at most :data:`MAX_REQUEST` (its records are still made whole)."""
    if isinstance(item, _Gather):
        return item.parts
    end = item.offset + item.length
    return tuple((o, min(MAX_REQUEST, end - o)) for o in range(item.offset, end, MAX_REQUEST))


@dataclass(frozen=True)
class _Wait:
    """No sweep read may start for ``seconds`` (the sweep's pace); copies still may."""

    seconds: float


class _SweepGate:
    """The sweep's pace, one for the whole backup (every device's planner asks it): the
    policy is agent/pace.py's, fed with the clocks and the copies seen so far."""

    def __init__(self, spec: PaceSpec, trackers: list[DeviceTracker]) -> None:
        self._pacer = SweepPacer(spec, time.monotonic())
        self._trackers = trackers
        self._lock = threading.Lock()

    @property
    def slowed(self) -> int:
        return self._pacer.slowed

    def wait(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._pacer.observe_copies(sum(t.copied_bytes for t in self._trackers), now)
            return self._pacer.wait(now)

    def spend(self, n: int) -> None:
        with self._lock:
            self._pacer.spend(n, time.monotonic())


@dataclass(frozen=True)
class _Zero:
    device: Device
    offset: int
    length: int


@dataclass(frozen=True)
class _Data:
    device: Device
    offset: int
    length: int
    compression: Compression
    payload: bytes | bytearray | memoryview
    digest: bytes | None  # None: the writer does not use one (sealed records, VMA)


_Record = _Data | _Zero
_Item = _Read | _Gather | _Zero  # what a planner hands the readers


# Plain classes below, not dataclasses: a dataclass costs ~0.3 ms of every start-up.
class _Filling:
    """A read's buffer while its NBD requests are in flight (a read may be cut in several,
    see :func:`_requests`): it goes to the workers when the last one is in."""

    __slots__ = ("buf", "item", "left")

    def __init__(self, item: _Read | _Gather, buf: bytearray, left: int) -> None:
        self.item = item
        self.buf = buf
        self.left = left  # requests still in flight


class _Request:
    """One NBD request in flight: ``length`` bytes at device ``offset``, part of ``filling``."""

    __slots__ = ("filling", "length", "offset")

    def __init__(self, filling: _Filling, offset: int, length: int) -> None:
        self.filling = filling
        self.offset = offset
        self.length = length


class _Planner:
    """Walks one device: block status window by window, yielding zeros and reads.

    Whichever reader thread needs the next window asks block status on its own
    connection (a handle is never driven by two threads), under the planner's lock.
    """

    def __init__(
        self, device: Device, source: NbdSource, opts: EngineOptions, control: Control,
        tracker: DeviceTracker | None = None, gate: _SweepGate | None = None,
    ) -> None:
        self._handle: nbd.NBD | None = None
        self._stopped = control.stopped
        self._it = self._walk(device, source, opts)
        self._lock = threading.Lock()
        self._device = device
        self._request = opts.request_size
        self._tracker = tracker
        self._gate = gate
        self._ready: deque[_Item] = deque()  # the sweep's, claimed

    def _walk(self, dev: Device, src: NbdSource, opts: EngineOptions) -> Iterator[_Item]:
        for pos in range(0, dev.size, opts.status_window):
            end = min(pos + opts.status_window, dev.size)
            q = pos
            while q < end:
                # An incremental backup copies only the changed runs (all of it otherwise).
                asked = q
                runs, q = src.changed(q, end - q, self._stopped)
                if self._tracker is not None and src.changes is not None:
                    for a, b in _between(asked, q, runs):  # clean: released with the rest
                        self._tracker.skip(a, b)
                parts: list[tuple[int, int]] = []
                gathered = 0  # bytes in parts
                for start, stop in runs:
                    if src.changes is None or stop - start >= STATUS_MIN_CHANGED:
                        yield from self._run(dev, src, opts, start, stop)
                        continue
                    # A small changed run is read at once: asking its allocation first
                    # costs a round trip as long as the read (zeros are still found after
                    # it), and it joins others in one gathered read.
                    for off in range(start, stop, opts.request_size):
                        n = min(opts.request_size, stop - off)
                        if parts and (len(parts) == GATHER_PARTS or
                                      gathered + n > opts.request_size):
                            yield _Gather(dev, tuple(parts))
                            parts, gathered = [], 0
                        parts.append((off, n))
                        gathered += n
                if parts:
                    yield _Gather(dev, tuple(parts))

    def _run(self, dev: Device, src: NbdSource, opts: EngineOptions,
             q: int, end: int) -> Iterator[_Item]:
        t = self._tracker
        while q < end:
            # In a live backup, ask only about ranges nobody claimed: a claimed range
            # may be released already, and QEMU refuses any request touching one.
            # (Claims happen only under the planner's lock, which we hold here.)
            gaps = [(q, end)] if t is None else t.unclaimed(q, end)
            if not gaps:
                break
            a, b = gaps[0]
            extents = src.extents(self._handle, a, b - a, self._stopped)
            for ext in extents:
                e = ext.offset + ext.length
                if ext.zero:
                    yield _Zero(dev, ext.offset, ext.length)
                else:
                    for off in range(ext.offset, e, opts.request_size):
                        yield _Read(dev, off, min(opts.request_size, e - off))
            q = extents[-1].offset + extents[-1].length  # maybe less than asked

    def next(self, h: nbd.NBD) -> _Item | _Wait | None:
        with self._lock:
            self._handle = h
            try:
                return self._next()
            finally:
                # Hold no handle between calls: dropping the last reference is what
                # closes a connection whose replies a stalled reader never took.
                self._handle = None

    def _next(self) -> _Item | _Wait | None:
        # Copies QEMU saved before a guest write never come through here: the target pushes
        # them (BackupEngine.push). The planner has only the sweep, paced by the gate.
        gate = self._gate
        if gate is not None and (wait := gate.wait()) > 0:
            return _Wait(wait)
        item = self._sweep()
        if gate is not None and isinstance(item, _Read | _Gather):
            gate.spend(item.length)
        return item

    def claim_pushed(self, parts: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """Claim data the copy-before-write target pushed (see :meth:`BackupEngine.push`),
        under this lock: the sweep asks block status only about ranges nobody claimed.
        Returns ``(start, end, position)``: the position of ``start`` in the parts laid
        one after another."""
        if self._tracker is None:
            return []
        owned: list[tuple[int, int, int]] = []
        pos = 0
        with self._lock:
            for offset, length in parts:
                owned += [(a, b, pos + a - offset)
                          for a, b in self._tracker.pushed(offset, length)]
                pos += length
        return owned

    def _sweep(self) -> _Item | None:
        t = self._tracker
        if t is None:
            return next(self._it, None)
        while not self._ready:
            item = next(self._it, None)
            if item is None:
                return None
            if isinstance(item, _Gather):
                parts = tuple((a, b - a) for off, n in item.parts for a, b in t.claim(off, off + n))
                if parts:
                    self._ready.append(_Gather(self._device, parts))
                continue
            for start, end in t.claim(item.offset, item.offset + item.length):
                self._ready.append(type(item)(self._device, start, end - start))
        return self._ready.popleft()


def _pack(dev: Device, owned: list[tuple[int, int, int]], buf: bytearray) -> _Read | _Gather:
    """The item for the owned ``(start, end, position in buf)`` parts of pushed data: the
    parts are moved to the buffer's start, one after another, as a gather lays them."""
    if len(owned) == 1 and owned[0][2] == 0:
        return _Read(dev, owned[0][0], owned[0][1] - owned[0][0])
    pos = 0
    for a, b, at in owned:
        if at != pos:  # (forward only: pos <= at)
            buf[pos:pos + b - a] = buf[at:at + b - a]
        pos += b - a
    return _Gather(dev, tuple((a, b - a) for a, b, _ in owned))


def _between(start: int, end: int, runs: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The parts of [start, end) outside ``runs`` (sorted, disjoint, inside it)."""
    for a, b in runs:
        if start < a:
            yield start, a
        start = b
    if start < end:
        yield start, end


@dataclass(frozen=True)
class _Prepared:
    records: list[_Record]
    buf: bytearray  # back to the pool once the records are written (payloads may view it)
    pool: BufferPool | None = None  # the pool buf came from; None: the read buffers


def _prepare_pushed(item: _Read | _Gather, buf: bytearray, spec: codec.CompressionSpec,
                    digest: bool, pool: BufferPool) -> _Prepared:
    return _Prepared(_prepare(item, buf, spec, digest).records, buf, pool)


def _prepare(item: _Read | _Gather, buf: bytearray, spec: codec.CompressionSpec,
             digest: bool) -> _Prepared:
    """Worker: split a read into zero and data runs, compress the data and, when the
    writer uses it (``digest``), digest it here, in parallel."""
    out: list[_Record] = []
    pos = 0
    for offset, length in _parts(item):
        _split(item.device, offset, memoryview(buf)[pos:pos + length], spec, digest, out)
        pos += length
    return _Prepared(out, buf)


def _split(dev: Device, base: int, view: memoryview, spec: codec.CompressionSpec,
           digest: bool, out: list[_Record]) -> None:
    """Append the records of ``view``, device bytes from ``base`` on, to ``out``."""
    nbuf = nbd.Buffer.from_buffer(view)
    length = len(view)
    if nbuf.is_zero():
        out.append(_Zero(dev, base, length))
        return

    def data(start: int, end: int) -> None:
        comp, payload = codec.compress(view[start:end], spec)
        dig = (data_body_digest(dev.id, base + start, end - start, comp, payload)
               if digest else None)
        out.append(_Data(dev, base + start, end - start, comp, payload, dig))

    run_start, run_zero = 0, False
    for off in range(0, length, ZERO_BLOCK):
        z = nbuf.is_zero(off, min(ZERO_BLOCK, length - off))
        if off == 0:
            run_zero = z
        elif z != run_zero:
            if run_zero:
                out.append(_Zero(dev, base + run_start, off - run_start))
            else:
                data(run_start, off)
            run_start, run_zero = off, z
    if run_zero:
        out.append(_Zero(dev, base + run_start, length - run_start))
    else:
        data(run_start, length)


@dataclass
class BackupResult:
    progress: Progress
    peak_buffer: int  # most bytes of read buffers in use at once (and of pushed copies)


class BackupEngine:
    """Copies devices from NBD sources into an archive writer."""

    def __init__(
        self,
        writer: ArchiveWriter | VmaWriter,
        sources: list[tuple[Device, NbdSource]],
        opts: EngineOptions,
        progress: ProgressFn | None = None,
        trackers: Mapping[int, DeviceTracker] | None = None,
        total: int | None = None,
    ) -> None:
        """``total``: bytes the backup will cover, for progress (default: every byte of
        every device; an incremental covers only the changes)."""
        self.writer = writer
        self.trackers = dict(trackers or {})  # device id -> live-backup bookkeeping
        self.sources = sources
        self.opts = opts
        self.control = Control()
        self.buffers = BufferPool(opts.request_size, opts.memory, self.control)
        # Copies pushed by the copy-before-write target have buffers of their own: in one
        # pool the sweep, stalled on a slow output, would hold every buffer, and copies
        # cost the target memory (they go first, as copies read back used to).
        self.push_buffers = BufferPool(opts.request_size, opts.memory, self.control)
        self.meter = Meter("backup", sum(d.size for d, _ in sources) if total is None else total,
                           progress)
        self._q: queue.Queue[Future[_Prepared] | _Zero | None] = queue.Queue()
        self._workers = ThreadPoolExecutor(opts.workers, thread_name_prefix="ba-work")
        self._gate = (_SweepGate(opts.pace, list(self.trackers.values()))
                      if opts.pace.paced else None)
        self._planners = [_Planner(d, s, opts, self.control, self.trackers.get(d.id),
                                   self._gate)
                          for d, s in sources]
        self._by_device = {d.id: p for (d, _), p in zip(sources, self._planners, strict=True)}
        self._push_lock = threading.Lock()
        self._pushes_closed = False  # the readers are done: the records are all queued

    def run(self) -> BackupResult:
        """Run to completion; raises the first error. Interruptible from the main thread."""
        ctl = self.control
        # Daemon threads: a writer blocked on a stalled pipe must not keep the process alive.
        writer_t = threading.Thread(target=ctl.guard(self._write_loop), name="ba-writer",
                                    daemon=True)
        nreaders = max((len(s.handles) for _, s in self.sources), default=0)
        readers = [
            threading.Thread(target=ctl.guard(partial(self._read_loop, i)), name=f"ba-read{i}",
                             daemon=True)
            for i in range(nreaders)
        ]
        try:
            with interrupts.held():  # a signal mid-start() would break threading's books
                writer_t.start()
                for t in readers:
                    t.start()
            for t in readers:
                interrupts.join(t)
            with self._push_lock:  # every range is claimed now: no push owns anything
                self._pushes_closed = True
            self._workers.shutdown(wait=True)
            self._q.put(None)
            interrupts.join(writer_t)
        except BaseException as e:  # KeyboardInterrupt and SystemExit included
            ctl.fail(e)
            raise
        finally:
            if ctl.error is not None:
                self._workers.shutdown(wait=False, cancel_futures=True)
                self._q.put(None)
                # Readers stop within one poll. The writer may sit in a write to a pipe
                # nobody reads: it is a daemon thread, so do not wait for it long.
                deadline = time.monotonic() + 2
                for t in [*readers, writer_t]:
                    if t.ident is not None:  # a signal may come before all were started
                        t.join(max(0.0, deadline - time.monotonic()))
        if ctl.error is not None:
            raise ctl.error
        return BackupResult(self.meter.final(), self.buffers.peak + self.push_buffers.peak)

    # -- copies pushed by the copy-before-write target (agent/cbw/feed.py) -------------

    def push_buffer(self, n: int, block: bool = True) -> bytearray | None:
        """A buffer for ``n`` bytes (at most ``opts.request_size``) of pushed data, from a
        budget of ``opts.memory`` beside the read buffers': it waits while they are all out,
        which holds the target's feed back (the target keeps the copies meanwhile). None
        once the backup stops (or at once when ``block`` is false and the budget is spent)."""
        return self.push_buffers.get(n, block)

    def push(self, device_id: int, parts: list[tuple[int, int]], buf: bytearray | None
             ) -> list[tuple[int, int]]:
        """QEMU copied these ``(offset, length)`` parts of a device before guest writes, and
        the target sent their data: in ``buf`` (from :meth:`push_buffer`, the parts one after
        another from its start; the engine owns it from now on), or all zeros when ``buf`` is
        None. Claims what nobody claimed yet and queues its records (one unit for all the
        parts, as a gathered read is); returns the ``(start, end)`` ranges claimed: only they
        may be dropped by the target, the others are read through the snapshot view."""
        planner = self._by_device[device_id]
        owned: list[tuple[int, int, int]] = []  # (start, end, its position in buf)
        with self._push_lock:
            if not self._pushes_closed and not self.control.stopped():
                owned = planner.claim_pushed(parts)
            try:
                if owned and buf is None:
                    for a, b, _ in owned:
                        self._q.put(_Zero(planner._device, a, b - a))
                elif owned and buf is not None:
                    item = _pack(planner._device, owned, buf)
                    fut = self._workers.submit(_prepare_pushed, item, buf,
                                               self.opts.compression,
                                               self.writer.wants_digest,
                                               self.push_buffers)
                    fut.add_done_callback(self._q.put)
                    buf = None
            except RuntimeError:  # the workers shut down: the backup failed meanwhile
                owned = []
        if buf is not None:
            self.push_buffers.put(buf)
        return [(a, b) for a, b, _ in owned]

    # -- readers -----------------------------------------------------------------------

    def _read_loop(self, conn: int) -> None:
        """Connection ``conn`` of every source that has that many: read, hand to workers."""
        for planner, (dev, src) in zip(self._planners, self.sources, strict=True):
            if conn < len(src.handles):
                self._read_source(planner, src.handles[conn], dev)
            if self.control.stopped():
                return

    def _read_source(self, planner: _Planner, h: nbd.NBD, dev: Device) -> None:
        ctl, opts = self.control, self.opts
        inflight: dict[int, _Request] = {}  # by cookie
        pending: _Read | _Gather | None = None
        exhausted = False
        while not ctl.stopped():
            paced = 0.0  # seconds the sweep must wait, if it must
            while not exhausted and len(inflight) < opts.inflight_per_connection:
                item = pending or planner.next(h)
                pending = None
                if item is None:
                    exhausted = True
                    break
                if isinstance(item, _Wait):
                    paced = item.seconds
                    break
                if isinstance(item, _Zero):
                    self._q.put(item)
                    continue
                buf = self.buffers.get(item.length, block=not inflight)
                if buf is None:
                    pending = item  # finish the reads in flight first, or stop
                    break
                parts = _requests(item)
                filling = _Filling(item, buf, len(parts))
                pos = 0
                for offset, length in parts:
                    try:
                        view = memoryview(buf)[pos:pos + length]
                        cookie = h.aio_pread(nbd.Buffer.from_buffer(view), offset)
                    except nbd.Error as e:
                        if pos == 0:  # no part of it in flight: the buffer is free
                            self.buffers.put(buf)
                        raise self._read_error(dev, offset, length, e) from e
                    inflight[cookie] = _Request(filling, offset, length)
                    pos += length
            if not inflight:
                if exhausted or ctl.stopped():
                    return
                if paced:
                    time.sleep(min(paced, PACE_NAP))
                continue
            # Replies may already have been taken in by a block-status call on this
            # handle: collect those first, or poll() would wait for data that never comes.
            if not self._harvest(h, dev, inflight):
                try:
                    # Bounded, so a stalled server cannot hide the stop flag from this
                    # thread (or keep its handle locked against shutdown()); while the
                    # sweep waits for its pace, only as long as that.
                    h.poll(max(1, int(min(POLL, paced or POLL) * 1000)))
                except nbd.Error as e:
                    raise SourceError(f"device {dev.name!r}: connection failed: "
                                      f"{e.string}") from e
                self._harvest(h, dev, inflight)

    def _harvest(self, h: nbd.NBD, dev: Device, inflight: dict[int, _Request]) -> int:
        """Hand every completed read to the workers; return how many requests were in."""
        done = 0
        # peek returns a completed cookie, 0 when none is ready, -1 when none is in flight
        while inflight and (cookie := h.aio_peek_command_completed()) > 0:
            req = inflight.pop(cookie)
            filling = req.filling
            try:
                h.aio_command_completed(cookie)  # retires it; raises if the read failed
            except nbd.Error as e:
                if filling.left == 1:  # no other part of it in flight: the buffer is free
                    self.buffers.put(filling.buf)
                raise self._read_error(dev, req.offset, req.length, e) from e
            done += 1
            filling.left -= 1
            if filling.left == 0:  # every part of it is in
                fut = self._workers.submit(_prepare, filling.item, filling.buf,
                                           self.opts.compression, self.writer.wants_digest)
                fut.add_done_callback(self._q.put)
        return done

    @staticmethod
    def _read_error(dev: Device, offset: int, length: int, e: nbd.Error) -> SourceError:
        return SourceError(
            f"device {dev.name!r}: read of {length} bytes at offset {offset} "
            f"failed: {e.string}"
        )

    # -- writer ------------------------------------------------------------------------

    def _write_loop(self) -> None:
        ctl = self.control
        while True:
            try:
                got = self._q.get(timeout=POLL)
            except queue.Empty:
                if ctl.stopped():
                    return
                continue
            if got is None:
                return
            if isinstance(got, _Zero):
                if not ctl.stopped():
                    self._write_records([got])
                continue
            prepared = got.result()
            try:
                if not ctl.stopped():
                    self._write_records(prepared.records)
            finally:
                (prepared.pool or self.buffers).put(prepared.buf)

    def _write_records(self, records: list[_Record]) -> None:
        w = self.writer
        with w.batch():  # one writev for a read's records (a gather's may be 16 or more)
            for r in records:
                if isinstance(r, _Zero):
                    w.write_zero(r.device.id, r.offset, r.length)
                    self.meter.add(zero=r.length)
                else:
                    w.write_data(r.device.id, r.offset, r.length, r.compression, r.payload,
                                 r.digest)
                    self.meter.add(data=r.length, stored=len(r.payload))
        for r in records:
            tracker = self.trackers.get(r.device.id)
            if tracker is not None:
                tracker.written(r.offset, r.length)  # in the archive: release it in QEMU
