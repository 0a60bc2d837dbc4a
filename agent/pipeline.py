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


class BufferPool:
    """Read buffers, reused: the cap on memory in flight, and no allocation (and no
    page faults for fresh zeroed memory) on the hot path. A buffer goes back to the
    pool only after every record made from it has been written."""

    def __init__(self, size: int, count: int, control: Control) -> None:
        self.size = size
        self.count = max(1, count)
        self._free: list[bytearray] = []
        self._made = 0
        self._cond = threading.Condition()
        self._control = control
        self.peak = 0  # most buffers out at once

    def get(self, block: bool = True) -> bytearray | None:
        with self._cond:
            while not self._free and self._made >= self.count:
                if not block or self._control.stopped():
                    return None
                self._cond.wait(POLL)
            if self._free:
                buf = self._free.pop()
            else:
                buf = bytearray(self.size)
                self._made += 1
            self.peak = max(self.peak, self._made - len(self._free))
            return buf

    def put(self, buf: bytearray) -> None:
        with self._cond:
            self._free.append(buf)
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
