"""The copy-before-write target's cluster store: bounded memory, then a bounded spool file.

QEMU's copy-before-write filter writes the *old* contents of a cluster to its target just
before a guest write overwrites it. The target (our nbdkit plugin) keeps those clusters
here until the agent has appended them to the archive and trims them.

::

    write(offset, data)      whole clusters, aligned (1 MiB pieces = 16 clusters); the last
                             cluster of the disk may be short (offset + len == size)
        │
        ├── all-zero cluster ──▶ shared zero marker (costs no memory, reported as zero)
        ├── memory has room  ──▶ dict  index -> bytes
        ├── spool has room   ──▶ dict  index -> (slot, length); slot i at byte i*cluster of
        │                        one unlinked temporary file; trimmed slots are reused
        └── neither          ──▶ StoreFull  (the plugin answers ENOSPC: QEMU breaks the
                                 snapshot, never the guest's write)

Every lookup is a dict access by cluster index (``offset // cluster``); nothing scans a
list per request.

Each cluster is written once. QEMU's copy-before-write filter copies a cluster once, before
the guest's first write to it, and never again after a trim (the trim resets the filter's copy
bitmap for that range): a second write to a cluster that was stored, or stored and trimmed, is
no copy QEMU makes but another client's attempt to put data of its own into the backup. It is
refused (:class:`Replaced`; the plugin answers EPERM), counted (``writes_refused``) and leaves
what is stored as it was. One bit per cluster of the disk records what was ever written
(2 MiB for a 1 TiB disk).

Subscribers (the control socket's ``feed`` clients, see
:mod:`agent.cbw.control`) learn of stored ranges through an append-only journal: a
subscription starts with every range stored at that moment, then receives each later write.
Delivered ranges are filtered to what is still stored at delivery time, so a range trimmed in
between is not announced. The journal keeps only entries some subscriber has not read yet;
without subscribers nothing is journaled. A write wakes waiting subscribers only when no wake
is pending since one of them last started to wait: a burst of copies costs one wake-up, not
one per cluster (a quarter of nbdkit's GIL time went to waking the stream per write).

Two ways out of the store: :meth:`ClusterStore.trim` (QEMU's discard, when the agent releases
a range on the snapshot view) and :meth:`ClusterStore.take` (the agent has the data from the
``feed`` stream and will never read it through QEMU). A taken cluster stays *allocated* for
block status: QEMU maps a copied cluster to its target and asserts the target has it, and it
never learns that the agent took it.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque
from collections.abc import Iterable

from agent.errors import AgentError

CLUSTER = 64 * 1024


class StoreError(AgentError):
    """A request the copy-before-write store cannot serve."""


class StoreFull(StoreError):
    """Memory and spool are both full: the copy cannot be kept."""


class NotStored(StoreError):
    """A read of a range that was never copied, or was already released."""


class Misaligned(StoreError):
    """A write that does not cover whole clusters."""


class Replaced(StoreError):
    """A write to a cluster that was already written (see the module docstring)."""


# The plugin starts on every live backup's critical path: this module and the plugin's
# avoid typing, dataclasses, re and tempfile, whose imports cost that start 10 ms.


class Extent:
    """One run of clusters with the same state, for block status."""

    __slots__ = ("length", "offset", "stored", "zero")

    def __init__(self, offset: int, length: int, stored: bool, zero: bool) -> None:
        self.offset = offset
        self.length = length
        self.stored = stored
        self.zero = zero

    def _key(self) -> tuple[int, int, bool, bool]:
        return self.offset, self.length, self.stored, self.zero

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Extent) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Extent{self._key()}"


class StoreStats:
    """Counters of a :class:`ClusterStore`; byte values unless named ``clusters_*``.
    ``vars()`` of one is the dict the control socket sends."""

    cluster: int
    memory_limit: int
    spool_limit: int
    memory_used: int
    spool_used: int
    peak_memory: int
    peak_spool: int
    clusters_stored: int
    clusters_copied: int
    zero_clusters_copied: int
    clusters_trimmed: int
    bytes_copied: int
    bytes_spilled: int
    full_errors: int
    longest_write_us: int  # the longest one copy took to store here: part of a guest's wait
    writes_refused: int  # writes to clusters already written: not QEMU's (module docstring)
    clusters_taken: int  # freed because the agent took them from the feed (not trimmed)
    bytes_read: int  # served to reads (QEMU reading copies back for the snapshot view)
    bytes_fed: int  # sent to the agent on the feed stream (agent.cbw.control)

    def __init__(self, **counters: int) -> None:
        if counters.keys() != self.__annotations__.keys():
            raise TypeError(f"StoreStats takes exactly {sorted(self.__annotations__)}")
        self.__dict__.update(counters)


class _Spooled:
    __slots__ = ("length", "slot")

    def __init__(self, slot: int, length: int) -> None:
        self.slot = slot
        self.length = length


class _Bits:
    """One bit per cluster index: a bitmap when the disk's size is known, else a set."""

    __slots__ = ("_map", "_set")

    def __init__(self, size: int | None, cluster: int) -> None:
        self._map = bytearray(-(-size // cluster // 8) + 1) if size is not None else None
        self._set: set[int] = set()

    def __contains__(self, index: int) -> bool:
        if self._map is None:
            return index in self._set
        return bool(self._map[index >> 3] & (1 << (index & 7)))

    def add(self, index: int) -> None:
        if self._map is None:
            self._set.add(index)
        else:
            self._map[index >> 3] |= 1 << (index & 7)


class ClusterStore:
    """Old clusters copied by QEMU, kept in memory up to a bound, then in a spool file.

    Thread-safe: nbdkit's parallel thread model calls in from several threads.
    ``size`` (the export size) allows a short last cluster when the disk size is not a
    multiple of ``cluster``.
    """

    def __init__(
        self,
        memory_limit: int,
        spool_dir: str | None,
        spool_limit: int,
        cluster: int = CLUSTER,
        *,
        size: int | None = None,
    ) -> None:
        if cluster <= 0 or cluster & (cluster - 1):
            raise StoreError(f"cluster size must be a power of two, got {cluster}")
        if memory_limit < 0 or spool_limit < 0:
            raise StoreError("memory and spool limits must not be negative")
        self.cluster = cluster
        self.size = size
        self.memory_limit = memory_limit
        self.spool_limit = spool_limit
        self._spool_slots = spool_limit // cluster
        self._zero = bytes(cluster)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._mem: dict[int, bytes] = {}
        self._zeros: dict[int, int] = {}  # index -> length of an all-zero cluster
        self._spool: dict[int, _Spooled] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._mem_used = 0
        self._peak_mem = 0
        self._peak_spool = 0
        self._copied = 0
        self._zero_copied = 0
        self._trimmed = 0
        self._bytes_copied = 0
        self._bytes_spilled = 0
        self._full_errors = 0
        self._longest_write_ns = 0
        self._refused = 0
        self._taken_count = 0
        self._bytes_read = 0
        self._bytes_fed = 0
        self._written = _Bits(size, cluster)  # clusters ever written
        self._taken = _Bits(size, cluster)  # clusters the agent took (module docstring)
        self._wake_pending = False  # a write woke the subscribers; none waits again yet
        self._journal: deque[tuple[int, int, int]] = deque()  # (seq, offset, length)
        self._seq = 0
        self._subs: set[Subscription] = set()
        self._closed = False
        self._spool_fd = -1
        if self._spool_slots:
            self._spool_fd = _unnamed_file(spool_dir or os.environ.get("TMPDIR") or "/tmp")

    # -- writes ---------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` (whole clusters, cluster-aligned) at ``offset``.

        Raises :class:`Misaligned` for a partial cluster and :class:`StoreFull` when memory and
        spool cannot take the data; after StoreFull the range holds nothing.
        """
        started = time.monotonic_ns()
        view = memoryview(data).cast("B")
        pieces = [
            (index, view[index * self.cluster - offset:][:length])
            for index, length in self._split(offset, len(view))
        ]
        zero = [chunk == self._zero[: len(chunk)] for _, chunk in pieces]
        with self._lock:
            self._check_open()
            self._check_first([index for index, _ in pieces], offset, len(view))
            self._reserve([len(c) for (_, c), z in zip(pieces, zero, strict=True) if not z])
            for (index, chunk), is_zero in zip(pieces, zero, strict=True):
                if is_zero:
                    self._zeros[index] = len(chunk)
                elif self._mem_used + len(chunk) <= self.memory_limit:
                    self._mem[index] = bytes(chunk)
                    self._mem_used += len(chunk)
                else:
                    slot = self._free_slots.pop() if self._free_slots else self._new_slot()
                    os.pwrite(self._spool_fd, chunk, slot * self.cluster)
                    self._spool[index] = _Spooled(slot, len(chunk))
                    self._bytes_spilled += len(chunk)
            self._mark_written([index for index, _ in pieces])
            self._stored(offset, len(view), len(pieces), sum(zero))
            self._longest_write_ns = max(self._longest_write_ns,
                                         time.monotonic_ns() - started)

    def _stored(self, offset: int, length: int, clusters: int, zero_clusters: int) -> None:
        """Count a completed write and journal it for subscribers (lock held)."""
        self._copied += clusters
        self._zero_copied += zero_clusters
        self._bytes_copied += length
        self._peak_mem = max(self._peak_mem, self._mem_used)
        self._peak_spool = max(self._peak_spool, len(self._spool) * self.cluster)
        if self._subs:
            self._journal.append((self._seq, offset, length))
            self._seq += 1
            if not self._wake_pending:  # once per batch (module docstring)
                self._wake_pending = True
                self._changed.notify_all()

    def write_zeroes(self, offset: int, length: int) -> None:
        """Store zero clusters (a write-zeroes request): costs no memory."""
        pieces = self._split(offset, length)
        with self._lock:
            self._check_open()
            self._check_first([index for index, _ in pieces], offset, length)
            for index, n in pieces:
                self._zeros[index] = n
            self._mark_written([index for index, _ in pieces])
            self._stored(offset, length, len(pieces), len(pieces))

    def _was_written(self, index: int) -> bool:
        return index in self._written

    def _mark_written(self, indices: list[int]) -> None:
        for index in indices:
            self._written.add(index)

    def _check_first(self, indices: list[int], offset: int, length: int) -> None:
        """Raise Replaced if any cluster was written before (lock held)."""
        again = [i for i in indices if self._was_written(i)]
        if again:
            self._refused += 1
            state = "still stored" if self._present(again[0]) else "already backed up"
            raise Replaced(
                f"copy-before-write target: refused a write of {length} bytes at offset "
                f"{offset}: cluster at offset {again[0] * self.cluster} was written before "
                f"({state}); QEMU copies a cluster once, so this write came from another "
                "client"
            )

    def _split(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(cluster index, length) of each cluster in an aligned write; raises Misaligned."""
        c = self.cluster
        end = offset + length
        if self.size is not None and (offset < 0 or end > self.size):
            raise Misaligned(
                f"copy-before-write target: write of {length} bytes at offset {offset} "
                f"goes past the end ({self.size})"
            )
        tail_ok = self.size is not None and end == self.size
        if offset % c or length <= 0 or (length % c and not tail_ok):
            raise Misaligned(
                f"copy-before-write target: write of {length} bytes at offset {offset} is not "
                f"aligned to the {c // 1024} KiB copy cluster"
            )
        return [(i, min(c, end - i * c)) for i in range(offset // c, (end + c - 1) // c)]

    def _reserve(self, lengths: list[int]) -> None:
        """Raise StoreFull unless memory plus free spool slots can take ``lengths``."""
        mem_free = self.memory_limit - self._mem_used
        spill = 0
        for length in lengths:
            if length <= mem_free:
                mem_free -= length
            else:
                spill += 1
        slots_free = self._spool_slots - len(self._spool)
        if spill > slots_free:
            self._full_errors += 1
            raise StoreFull(
                f"copy-before-write store is full: {self._mem_used} of {self.memory_limit} "
                f"bytes of memory and {len(self._spool) * self.cluster} of {self.spool_limit} "
                f"bytes of spool in use, {sum(lengths)} more bytes needed"
            )

    def _new_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        return slot

    # -- reads ----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """The stored bytes of ``[offset, offset+length)``; raises NotStored for any gap."""
        c = self.cluster
        end = offset + length
        pieces: list[bytes | memoryview] = []
        with self._lock:
            self._check_open()
            for index in range(offset // c, (end + c - 1) // c):
                start = max(offset, index * c) - index * c
                stop = min(end, (index + 1) * c) - index * c
                data = self._cluster_data(index)
                if data is None or stop > len(data):
                    raise NotStored(
                        f"copy-before-write target: no data stored at offset "
                        f"{index * c + (len(data) if data is not None else 0)} "
                        f"(read of {length} bytes at {offset})"
                    )
                pieces.append(data if stop - start == len(data) else
                              memoryview(data)[start:stop])
            self._bytes_read += length
        # The bytes are immutable and outlive a trim: join outside the lock, copying once
        # (a whole cluster not at all).
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]
        return b"".join(pieces)

    def data_runs(self, offset: int, length: int, limit: int
                  ) -> list[tuple[int, int, list[bytes] | None]]:
        """The clusters of ``[offset, offset+length)`` still stored, as runs of at most
        ``limit`` bytes for the ``feed`` stream: ``(offset, length, chunks)`` for data,
        ``(offset, length, None)`` for all-zero clusters. Gaps (trimmed or taken) are
        left out."""
        c = self.cluster
        end = offset + length
        runs: list[tuple[int, int, list[bytes] | None]] = []
        with self._lock:
            self._check_open()
            for index in range(offset // c, (end + c - 1) // c):
                zero = self._zeros.get(index)
                data = None if zero is not None else self._cluster_data(index)
                if zero is None and data is None:
                    continue
                n = zero if zero is not None else len(data or b"")
                pos = index * c
                if runs:
                    o, m, chunks = runs[-1]
                    if o + m == pos and (chunks is None) == (data is None) and m + n <= limit:
                        if chunks is not None and data is not None:
                            chunks.append(data)
                        runs[-1] = (o, m + n, chunks)
                        continue
                runs.append((pos, n, None if data is None else [data]))
            self._bytes_fed += sum(n for _, n, chunks in runs if chunks is not None)
        return runs

    def _cluster_data(self, index: int) -> bytes | None:
        data = self._mem.get(index)
        if data is not None:
            return data
        zero = self._zeros.get(index)
        if zero is not None:
            return self._zero[:zero]
        spooled = self._spool.get(index)
        if spooled is None:
            return None
        return os.pread(self._spool_fd, spooled.length, spooled.slot * self.cluster)

    def _present(self, index: int) -> bool:
        return index in self._mem or index in self._zeros or index in self._spool

    def _count(self) -> int:
        return len(self._mem) + len(self._zeros) + len(self._spool)

    def _all_indices(self) -> list[int]:
        return [*self._mem, *self._zeros, *self._spool]

    # -- release --------------------------------------------------------------------------

    def trim(self, offset: int, length: int) -> int:
        """Free every whole cluster inside the range; returns how many were freed.

        Partial clusters at either end are kept (the range is rounded inward), except a short
        last cluster of the disk, which a range up to the end covers whole.
        """
        return self._free(offset, length, taken=False)

    def take(self, offset: int, length: int) -> int:
        """The agent has the range from the feed and will not read it through QEMU: free
        it as :meth:`trim` does, but keep its clusters allocated for block status (module
        docstring). Returns how many clusters were freed."""
        return self._free(offset, length, taken=True)

    def _free(self, offset: int, length: int, *, taken: bool) -> int:
        c = self.cluster
        end = offset + length
        first = -(-offset // c)
        last = end // c  # exclusive
        if self.size is not None and end >= self.size and self.size % c:
            last = self.size // c + 1
        freed = 0
        with self._lock:
            self._check_open()
            if last - first > self._count():
                candidates: Iterable[int] = [
                    i for i in self._all_indices() if first <= i < last
                ]
            else:
                candidates = range(first, last)
            for index in candidates:
                if self._drop(index):
                    freed += 1
                    if taken:
                        self._taken.add(index)
            if taken:
                self._taken_count += freed
            else:
                self._trimmed += freed
            if not self._spool and self._next_slot:
                # Everything spilled has been released: give the disk space back.
                os.ftruncate(self._spool_fd, 0)
                self._free_slots.clear()
                self._next_slot = 0
        return freed

    def _drop(self, index: int) -> int:
        data = self._mem.pop(index, None)
        if data is not None:
            self._mem_used -= len(data)
            return 1
        if self._zeros.pop(index, None) is not None:
            return 1
        spooled = self._spool.pop(index, None)
        if spooled is not None:
            self._free_slots.append(spooled.slot)
            return 1
        return 0

    # -- block status ---------------------------------------------------------------------

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Contiguous, ascending runs covering ``[offset, offset+length)``.

        Stored clusters are ``stored`` (and ``zero`` when all-zero), the rest are holes.
        """
        c = self.cluster
        end = offset + length
        first, last = offset // c, (end + c - 1) // c
        with self._lock:
            if last - first > self._count() and not self._taken_count:
                indices = sorted(i for i in self._all_indices() if first <= i < last)
            else:
                indices = [i for i in range(first, last)
                           if self._present(i) or i in self._taken]
            states = [(i, i in self._zeros) for i in indices]
        runs: list[Extent] = []
        pos = offset
        for index, zero in states:
            start, stop = max(offset, index * c), min(end, (index + 1) * c)
            if start > pos:
                _append(runs, Extent(pos, start - pos, False, False))
            _append(runs, Extent(start, stop - start, True, zero))
            pos = stop
        if pos < end:
            _append(runs, Extent(pos, end - pos, False, False))
        return runs

    # -- stats, subscriptions, close ------------------------------------------------------

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                cluster=self.cluster,
                memory_limit=self.memory_limit,
                spool_limit=self.spool_limit,
                memory_used=self._mem_used,
                spool_used=len(self._spool) * self.cluster,
                peak_memory=self._peak_mem,
                peak_spool=self._peak_spool,
                clusters_stored=self._count(),
                clusters_copied=self._copied,
                zero_clusters_copied=self._zero_copied,
                clusters_trimmed=self._trimmed,
                bytes_copied=self._bytes_copied,
                bytes_spilled=self._bytes_spilled,
                full_errors=self._full_errors,
                longest_write_us=self._longest_write_ns // 1000,
                writes_refused=self._refused,
                clusters_taken=self._taken_count,
                bytes_read=self._bytes_read,
                bytes_fed=self._bytes_fed,
            )

    def subscribe(self) -> Subscription:
        """Start receiving stored ranges: everything stored now, then every later write."""
        with self._lock:
            self._check_open()
            backlog = self._runs(sorted(self._all_indices()))
            sub = Subscription(self, backlog, self._seq)
            self._subs.add(sub)
            return sub

    def close(self) -> None:
        """Drop all data, close the spool file and wake every subscriber. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._mem.clear()
            self._zeros.clear()
            self._spool.clear()
            self._journal.clear()
            self._changed.notify_all()
            if self._spool_fd >= 0:
                os.close(self._spool_fd)
                self._spool_fd = -1

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("copy-before-write store is closed")

    def _next_batch(self, sub: Subscription, timeout: float | None) -> list[tuple[int, int]] | None:
        with self._lock:
            if sub.backlog:
                batch, sub.backlog = sub.backlog, []
                return batch
            if not self._closed and sub.active and sub.cursor == self._seq:
                self._wake_pending = False  # the next write wakes us (module docstring)
                self._changed.wait(timeout)
            if self._closed or not sub.active:
                return None
            first = self._journal[0][0] if self._journal else self._seq
            entries = list(self._journal)[sub.cursor - first:]
            sub.cursor = self._seq
            self._compact()
            ranges: list[tuple[int, int]] = []
            for _, offset, length in entries:
                ranges += self._still_stored(offset, length)
            return ranges

    def _still_stored(self, offset: int, length: int) -> list[tuple[int, int]]:
        c = self.cluster
        end = offset + length
        present = [i for i in range(offset // c, (end + c - 1) // c) if self._present(i)]
        return self._runs(present)

    def _runs(self, indices: list[int]) -> list[tuple[int, int]]:
        """Coalesce ascending cluster indices into (offset, length) runs, clipped to size."""
        c = self.cluster
        runs: list[tuple[int, int]] = []
        for index in indices:
            length = c if self.size is None else min(c, self.size - index * c)
            if runs and runs[-1][0] + runs[-1][1] == index * c:
                runs[-1] = (runs[-1][0], runs[-1][1] + length)
            else:
                runs.append((index * c, length))
        return runs

    def _compact(self) -> None:
        low = min((s.cursor for s in self._subs), default=self._seq)
        while self._journal and self._journal[0][0] < low:
            self._journal.popleft()

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            sub.active = False
            self._subs.discard(sub)
            self._compact()
            self._changed.notify_all()


class Subscription:
    """One reader of stored ranges; see :meth:`ClusterStore.subscribe`."""

    def __init__(self, store: ClusterStore, backlog: list[tuple[int, int]], cursor: int) -> None:
        self._store = store
        self.backlog = backlog
        self.cursor = cursor
        self.active = True

    def get(self, timeout: float | None = None) -> list[tuple[int, int]] | None:
        """Ranges ``(offset, length)`` stored since the last call (possibly empty after
        ``timeout``); None once the store or the subscription is closed."""
        return self._store._next_batch(self, timeout)

    def close(self) -> None:
        self._store._unsubscribe(self)


def _append(runs: list[Extent], ext: Extent) -> None:
    if runs and runs[-1].stored == ext.stored and runs[-1].zero == ext.zero:
        last = runs[-1]
        runs[-1] = Extent(last.offset, last.length + ext.length, last.stored, last.zero)
    else:
        runs.append(ext)


def _unnamed_file(where: str) -> int:
    """A file descriptor of a new file in directory ``where`` that has no name (nothing is
    left behind, whatever happens to the process)."""
    try:
        try:
            return os.open(where, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
        import tempfile  # a file system without O_TMPFILE: create, then unlink

        with tempfile.TemporaryFile(prefix="cbw-spool-", dir=where) as f:
            return os.dup(f.fileno())  # the dup keeps the (already unlinked) file open
    except OSError as e:
        raise StoreError(f"spool directory {where}: {e.strerror or e}") from e
