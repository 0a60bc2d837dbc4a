"""Bookkeeping of a live backup, per device: what is claimed, written and released.

During a live backup two producers want the same bytes: the sweep over the
point-in-time view, and QEMU's copy-before-write, whose target pushes every cluster it
saved just before a guest write (those cost memory in the target, so they go first).
Each range is *claimed* before it is read, by whichever comes first, so no byte is read
or recorded twice. Once a range is in the archive it is *released*: trimmed on the
snapshot view, so QEMU stops copying it and the target frees it. Releases cover whole
copy clusters only (an unaligned trim aborts QEMU 7.2; there the disk's last cluster may be
partial, while later QEMUs cannot release a partial one at all: ``partial_tail``), so a
cluster is released when the last of its bytes is written, whichever records they came in.

Copies come *pushed*: the target sends each copied cluster's data to the agent
(agent/cbw/feed.py), which writes it without reading it through QEMU. A pushed range is
claimed like any other; the parts someone claimed first are dropped (both sources hold the
same point-in-time data, and the claimant reads it through the snapshot view, where the
target must keep it until QEMU's trim). Whole clusters the push owns are marked released at
once: QEMU copied them, so it never copies them again and needs no trim, and the target frees
them on the agent's word instead. A trim of a written run then leaves them out.

An incremental backup never reads the ranges its bitmap says are clean: the planner
*skips* them, and they are released together with the written ranges they touch. Its
scattered clusters then release as a few long ranges, not one trim (a round trip through
QEMU and the target) per cluster.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from agent.archive.intervals import IntervalSet

ReleaseFn = Callable[[int, int], None]  # (offset, length), whole clusters


class DeviceTracker:
    def __init__(self, size: int, cluster: int, release: ReleaseFn, *,
                 partial_tail: bool = True) -> None:
        self.size = size
        self.cluster = cluster
        self.partial_tail = partial_tail
        """A partial last cluster can be released (QEMU 7.2; see agent.qemu.caps)."""
        self._release = release
        self._lock = threading.Lock()
        self._claimed = IntervalSet()
        self._written = IntervalSet()  # written or skipped
        self._released = IntervalSet()
        self.copied_ranges = 0  # pushed by the copy-before-write target
        self.copied_bytes = 0  # in those ranges (the adaptive sweep's signal: agent/pace.py)
        self.copied_first = 0  # parts of those the push claimed before the sweep
        self.released_bytes = 0  # trimmed on the snapshot view
        self.pushed_bytes = 0  # taken from the target's feed (never read through QEMU)

    # -- producers ---------------------------------------------------------------------

    def pushed(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The target sent the data of [offset, offset+length), which QEMU copied: claim it
        and return the parts nobody claimed before, now the caller's to write. Its whole
        clusters are released without a trim (module docstring)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        c = self.cluster
        with self._lock:
            self.copied_ranges += 1
            self.copied_bytes += end - offset
            owned = self._claimed.claim(offset, end)
            self.copied_first += len(owned)
            for a, b in owned:
                self.pushed_bytes += b - a
                lo = -(-a // c) * c
                hi = b if b == self.size else b - b % c
                if lo < hi:
                    self._released.claim(lo, hi)
            return owned

    def claim(self, start: int, end: int) -> list[tuple[int, int]]:
        with self._lock:
            return self._claimed.claim(start, end)

    def unclaimed(self, start: int, end: int) -> list[tuple[int, int]]:
        """Parts of [start, end) nobody claimed. Only those may be asked for block status:
        a claimed range may be released already, and QEMU refuses any request (block
        status included) that touches a released range of the snapshot."""
        with self._lock:
            return self._claimed.missing(start, end)

    # -- the writer --------------------------------------------------------------------

    def skip(self, start: int, end: int) -> None:
        """Nothing in [start, end) will be backed up (an incremental's clean range): it is
        claimed, and released along with the next written range it touches."""
        with self._lock:
            for a, b in self._claimed.claim(start, end):
                self._written.add(a, b)

    def written(self, offset: int, length: int) -> None:
        """Bytes are in the archive: release every whole cluster of the written (or skipped)
        run they belong to that is not released yet."""
        c = self.cluster
        with self._lock:
            self._written.add(offset, offset + length)
            run = self._written.run_containing(offset)
            if run is None:  # cannot happen: the range was just added
                return
            lo = -(-run[0] // c) * c  # whole clusters only: round inward
            hi = run[1]
            if hi != self.size or not self.partial_tail:  # (the last cluster may be partial)
                hi -= hi % c
            if hi <= lo:
                return
            spans = self._released.claim(lo, hi)
            self.released_bytes += sum(b - a for a, b in spans)
        for a, b in spans:
            self._release(a, b - a)
