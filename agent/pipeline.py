"""Shared machinery of the backup and restore pipelines: a byte budget, a stop
flag that carries the first error, and progress events.

Both pipelines are a few threads joined by queues. Any thread that fails calls
:meth:`Control.fail`; every loop checks :meth:`Control.stopped` and every wait is
bounded, so one failure stops everything promptly and the first error is the
one reported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

POLL = 0.2  # seconds: how long any wait goes before it looks at the stop flag


@dataclass(frozen=True)
class Progress:
    """A progress event: what a front end needs to draw a bar or print a JSON line."""

    phase: str  # "backup" or "restore"
    done: int  # device bytes handled so far (data and zeros)
    total: int  # device bytes to handle in all
    data_bytes: int  # device bytes read (backup) or written (restore) as data
    zero_bytes: int  # device bytes recorded or restored as zeros
    stored_bytes: int  # archive payload bytes written (backup) or read (restore)
    elapsed: float  # seconds since the start


ProgressFn = Callable[[Progress], None]


class Control:
    """The stop flag of one pipeline, holding the first error."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def fail(self, e: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = e
        self._stop.set()

    def stopped(self) -> bool:
        return self._stop.is_set()

    def check_failed(self) -> None:
        """Raise the first error, if any thread failed."""
        if self.error is not None:
            raise self.error

    def guard_call(self, fn: Callable[..., None], *args: object) -> None:
        """Call ``fn``; an exception stops the pipeline and propagates."""
        try:
            fn(*args)
        except BaseException as e:
            self.fail(e)
            raise

    def guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Wrap a thread's body so an exception stops the pipeline instead of vanishing."""

        def run() -> None:
            try:
                fn()
            except BaseException as e:
                self.fail(e)

        return run


class ByteBudget:
    """Caps the bytes in flight. A slow consumer stalls producers; nothing grows."""

    def __init__(self, limit: int, control: Control) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._control = control

    def acquire(self, n: int, block: bool = True) -> bool:
        with self._cond:
            # One request larger than the whole budget may still go alone.
            while self.used and self.used + n > self.limit:
                if not block or self._control.stopped():
                    return False
                self._cond.wait(POLL)
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


#: Smallest read buffer: the copy-before-write cluster.
MIN_BUFFER = 64 * 1024


class BufferPool:
    """Read buffers, reused: the cap on memory in flight, and no allocation (and no
    page faults for fresh zeroed memory) on the hot path. A buffer goes back to the
    pool only after every record made from it has been written.

    Buffers come in sizes from :data:`MIN_BUFFER` doubling up to ``size`` (the largest
    read), and ``capacity`` bounds the bytes of all buffers out at once: small reads (the
    scattered clusters of an incremental) take small buffers, so many more of them are
    in flight than if each took a buffer of the largest size.
    """

    def __init__(self, size: int, capacity: int, control: Control) -> None:
        self.size = size
        self.capacity = max(size, capacity)
        self._free: dict[int, list[bytearray]] = {}
        self._kept = 0  # bytes in the free lists
        self._out = 0  # bytes of buffers handed out
        self._cond = threading.Condition()
        self._control = control
        self.peak = 0  # most bytes out at once

    def _class(self, n: int) -> int:
        c = MIN_BUFFER
        while c < n:
            c *= 2
        return min(c, self.size) if n <= self.size else n

    def get(self, n: int | None = None, block: bool = True) -> bytearray | None:
        """A buffer of at least ``n`` bytes (default ``size``); None when ``block`` is
        false and the budget is spent, or when the pipeline stops."""
        c = self._class(self.size if n is None else n)
        with self._cond:
            while self._out + c > self.capacity:
                if not block or self._control.stopped():
                    return None
                self._cond.wait(POLL)
            self._out += c
            self.peak = max(self.peak, self._out)
            free = self._free.get(c)
            if free:
                self._kept -= c
                return free.pop()
            # A new buffer: drop kept ones of other sizes so that memory stays in budget.
            for size in sorted(self._free, reverse=True):
                while self._free[size] and self._kept + self._out > self.capacity:
                    self._free[size].pop()
                    self._kept -= size
        return bytearray(c)

    def put(self, buf: bytearray) -> None:
        with self._cond:
            self._out -= len(buf)
            self._free.setdefault(len(buf), []).append(buf)
            self._kept += len(buf)
            self._cond.notify()


class Meter:
    """Counts progress and hands events to a callback at most every ``interval`` s."""

    def __init__(self, phase: str, total: int, fn: ProgressFn | None, interval: float = 0.2):
        self.phase = phase
        self.total = total
        self.fn = fn
        self.interval = interval
        self.start = time.monotonic()
        self._last = 0.0
        self.data_bytes = 0
        self.zero_bytes = 0
        self.stored_bytes = 0

    def add(self, data: int = 0, zero: int = 0, stored: int = 0) -> None:
        self.data_bytes += data
        self.zero_bytes += zero
        self.stored_bytes += stored
        if self.fn is not None:
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self.fn(self.snapshot())

    def snapshot(self) -> Progress:
        return Progress(
            self.phase, self.data_bytes + self.zero_bytes, self.total, self.data_bytes,
            self.zero_bytes, self.stored_bytes, time.monotonic() - self.start,
        )

    def final(self) -> Progress:
        snap = self.snapshot()
        if self.fn is not None:
            self.fn(snap)
        return snap
